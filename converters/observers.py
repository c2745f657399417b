"""PT2E calibration once per component: the observers of one calibrated graph reused by the others.

While a PT2E-prepared graph calibrates, its observers pass their inputs through unchanged, so every
observer sees the float model's own values whatever else is annotated. The sensitivity pass prepares the
same float graph once per candidate set of nodes kept in float; the observers such a graph holds are a
subset of those of the fully quantized one, on the same tensors, fed the same values in the same order.
`calibrated_observers` takes them from the calibrated graph, keyed by what each observes; `reuse`
installs copies of them in a newly prepared graph, which then converts to exactly what a calibration of
its own would give. An observer without an exact match (another configuration, another set of observed
tensors: a concatenation's shared observer when one of its sources is kept in float) is calibrated on its
own, with every other observer passing values through (`calibrating_only`), and then lent on (`lend`):
the sensitivity pass's later candidates often keep the same node in float, and a calibration runs the
whole model on every calibration sample (84 s for the sdxs-512 U-Net at 512x512 on 2 cores).

Converting a graph asks each observer for its quantization parameters; a histogram observer answers by
searching its histogram for the range of least quantization error, milliseconds per call and thousands
of calls per sensitivity pass, the same answer each time for the same calibrated state.
`memoized_qparams` answers an observer whose state (settings and buffers) was seen before from the
first answer.
"""

from __future__ import annotations

import contextlib
import copy

ObserverKey = tuple  # (observer class and settings, names of the float tensors it observes in graph order)


def _is_observer(module) -> bool:
    from torchao.quantization.pt2e.observer import _is_activation_post_process

    return _is_activation_post_process(module)


def _source(node, observer_nodes: set) -> str:
    """The float tensor an observer call observes: through other observers, which pass values on."""
    while node in observer_nodes:
        node = node.args[0]
    return node.name


def _settings(module) -> tuple:
    """The observer's class and public attributes (its configuration; its state lives in buffers). An
    attribute that calibration changed would differ from a fresh observer's and so never match."""
    public = sorted((k, repr(v)) for k, v in vars(module).items() if not k.startswith("_") and k != "training")
    return (type(module).__qualname__, *public)


def _sites(gm) -> dict[int, tuple[list[str], list]]:
    """Per observer instance (by id): its attribute names in `gm` and its call nodes in graph order."""
    # An instance shared by several attribute names is listed under each (named_modules would list it once).
    modules = dict(gm.named_modules(remove_duplicate=False))
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and _is_observer(modules.get(str(n.target)))]
    out: dict[int, tuple[list[str], list]] = {}
    for n in calls:
        mod = modules[str(n.target)]
        names, nodes = out.setdefault(id(mod), ([], []))
        if str(n.target) not in names:
            names.append(str(n.target))
        nodes.append(n)
    return out


def _keyed(gm) -> dict[ObserverKey, list[list[str]]]:
    """Each observer key -> the attribute names of every instance with it (more than one: ambiguous)."""
    sites = _sites(gm)
    observer_nodes = {n for _, nodes in sites.values() for n in nodes}
    out: dict[ObserverKey, list[list[str]]] = {}
    for names, nodes in sites.values():
        key = (_settings(getattr(gm, names[0])), tuple(_source(n.args[0], observer_nodes) for n in nodes))
        out.setdefault(key, []).append(names)
    return out


def calibrated_observers(gm) -> dict[ObserverKey, object]:
    """The observers of a calibrated prepared graph, by key (ambiguous keys left out)."""
    return {k: getattr(gm, inst[0][0]) for k, inst in _keyed(gm).items() if len(inst) == 1}


def lend(gm, calibrated: dict[ObserverKey, object]) -> None:
    """Add copies of the observers of the calibrated prepared graph `gm` that `calibrated` lacks: a later
    graph with the same observer (a concatenation's, shared over the same tensors once more) reuses it
    instead of running the model on every calibration sample again."""
    for k, obs in calibrated_observers(gm).items():
        if k not in calibrated:
            calibrated[k] = copy.deepcopy(obs)


def reuse(gm, calibrated: dict[ObserverKey, object]) -> list[str]:
    """Install copies of the `calibrated` observers in the prepared graph `gm` where one matches exactly;
    returns the attribute names of the observers left without a match, which still need calibrating
    (all of them when nothing is calibrated yet; none: `gm` needs no calibration)."""
    missing = []
    for k, instances in _keyed(gm).items():
        if len(instances) > 1 or k not in calibrated:
            missing += [name for names in instances for name in names]
            continue
        twin = copy.deepcopy(calibrated[k])  # one copy per instance, shared by its attribute names
        for name in instances[0]:
            setattr(gm, name, twin)
    return missing


@contextlib.contextmanager
def calibrating_only(gm, names: list[str]):
    """While calibrating `gm`, only the observers named `names` observe: every other observer attribute is
    swapped for a pass-through (observers pass values on unchanged, so the named ones see exactly what a
    full calibration would show them) and put back afterwards."""
    import torch

    keep = set(names)
    swapped = {
        name: mod
        for name, mod in gm.named_modules(remove_duplicate=False)
        if _is_observer(mod) and name not in keep and "." not in name
    }
    try:
        for name in swapped:
            setattr(gm, name, torch.nn.Identity())
        yield gm
    finally:
        for name, mod in swapped.items():
            setattr(gm, name, mod)


def _state_key(observer) -> tuple:
    """An observer's settings and the bytes of every buffer (histogram, range): equal keys, equal answers."""
    buffers = tuple(
        (name, str(b.dtype), tuple(b.shape), b.detach().cpu().contiguous().numpy().tobytes())
        for name, b in observer.named_buffers()
    )
    return (_settings(observer), buffers)


@contextlib.contextmanager
def memoized_qparams(memo: dict):
    """While active, `HistogramObserver.calculate_qparams` of a state already in `memo` returns copies of
    the stored answer instead of searching the histogram again; new states are searched and stored."""
    from torchao.quantization.pt2e.observer import HistogramObserver

    search = HistogramObserver.calculate_qparams

    def calculate_qparams(self):
        key = _state_key(self)
        if key not in memo:
            memo[key] = search(self)
        return tuple(t.clone() for t in memo[key])

    HistogramObserver.calculate_qparams = calculate_qparams
    try:
        yield
    finally:
        HistogramObserver.calculate_qparams = search
