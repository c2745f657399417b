"""The int8 sensitivity pass's cache (`converters.sensitivity_cache`) and its one calibration per component
(`converters.observers`): a second conversion reuses what the first measured and keeps the same nodes in
float; an entry on disk that is corrupt, malformed or of another key is ignored with a warning."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from converters.base import ConversionConfig
from converters.sensitivity import Quantizer, QuantNode, run_pass
from converters.sensitivity_cache import SWITCH_ENV, Entry, content_key


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXS_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(SWITCH_ENV, raising=False)
    return tmp_path / "cache" / "sensitivity"


def _job(name="unet"):
    cfg = ConversionConfig(target="onnx", precision="int8", components=(name,), resolution=64, sensitivity_shortlist=4)
    return SimpleNamespace(
        name=name, inputs=[SimpleNamespace(name="latent")], spec=SimpleNamespace(sensitivity_target_db=28.0), config=cfg
    )


def _quantizer(log: list, key: str = "k" * 64) -> Quantizer:
    """A component of 20 nodes where keeping n0 and n1 in float helps; records every quantize call."""
    nodes = [QuantNode(f"n{i}", (f"t{i}",)) for i in range(20)]

    def quantize(excluded):
        log.append(tuple(excluded))
        return tuple(excluded)

    def score(artifact):
        return 20.0 + 5.0 * ("n0" in artifact) + 4.0 * ("n1" in artifact)

    return Quantizer(
        quantize, score, lambda full: nodes, lambda full, c: [(n.name, 30.0 + i) for i, n in enumerate(c)], key
    )


def test_second_pass_measures_nothing_and_keeps_the_same_nodes(cache):
    first_log, second_log = [], []
    best1, rep1 = run_pass(_job(), _quantizer(first_log))
    best2, rep2 = run_pass(_job(), _quantizer(second_log))
    assert rep1["cache"]["scores_measured"] > 1 and rep2["cache"]["scores_measured"] == 0
    assert rep2["cache"]["scores_reused"] >= rep1["cache"]["scores_measured"]
    assert best1 == best2 == ("n0", "n1")  # the kept artifact is the same float-node choice
    assert {k: v for k, v in rep1.items() if k != "cache"} == {k: v for k, v in rep2.items() if k != "cache"}
    assert second_log == [("n0", "n1")]  # only the model it keeps is quantized again
    assert len(list(cache.glob("unet-*.json"))) == 1


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "unreadable"),
        ('{"format": "sdxs-edge-sensitivity-cache", "version": 1, "key": "other"}', "another key"),
        ("KEYED_BAD_EVALUATIONS", "malformed evaluations"),
        ("KEYED_BAD_CANDIDATES", "malformed candidates"),
        ("\udcff", "unreadable"),
    ],
)
def test_a_bad_entry_is_ignored_with_a_warning_and_rewritten(cache, text, why):
    key = "k" * 64
    run_pass(_job(), _quantizer([], key))
    (entry,) = cache.glob("unet-*.json")
    good = json.loads(entry.read_text())
    if text == "KEYED_BAD_EVALUATIONS":
        text = json.dumps({**good, "evaluations": {"": "30 dB"}})
    elif text == "KEYED_BAD_CANDIDATES":
        text = json.dumps({**good, "candidates": [["n0", "t0"]]})
    entry.write_bytes(text.encode("utf-8", "surrogateescape"))
    log: list = []
    with pytest.warns(UserWarning, match=f"ignoring the sensitivity cache entry .*{why}"):
        best, rep = run_pass(_job(), _quantizer(log, key))
    assert best == ("n0", "n1") and rep["cache"]["scores_reused"] <= 1 and rep["cache"]["scores_measured"] > 1
    assert json.loads(entry.read_text())["evaluations"] == good["evaluations"]  # measured again and rewritten


def test_cache_off_and_keys_follow_the_samples(cache, monkeypatch):
    job = _job()
    a = [np.zeros((1, 4), np.float32)]
    k1 = content_key(job, "model", "to_onnx.py", [a], [a], [a[0]])
    assert k1 == content_key(job, "model", "to_onnx.py", [a], [a], [a[0]])
    assert k1 != content_key(job, "model", "to_onnx.py", [[a[0] + 1]], [a], [a[0]])
    assert k1 != content_key(job, "other model", "to_onnx.py", [a], [a], [a[0]])
    assert k1 != content_key(_job("decoder"), "model", "to_onnx.py", [a], [a], [a[0]])
    with monkeypatch.context() as m:  # scores measured on another CPU class
        m.setattr("sdxs_edge.cpu.host_class", lambda: "arm64")
        assert k1 != content_key(job, "model", "to_onnx.py", [a], [a], [a[0]])
    monkeypatch.setenv(SWITCH_ENV, "off")
    log: list = []
    run_pass(job, _quantizer(log))
    run_pass(job, _quantizer(log))
    assert not cache.exists() and Entry(None, "unet", k1).path is None


def test_candidate_graphs_reuse_the_one_calibration_exactly():
    """A graph prepared with nodes left out takes its observers from the fully annotated graph's one
    calibration (calibrating alone those without a twin) and converts to exactly what calibrating it
    anew gives."""
    from converters import observers
    from converters.to_executorch import _quantizable_targets, _quantizer

    class Net(torch.nn.Module):  # the decoder's sub-pixel upsampling: a concatenation of slices of one conv
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
            self.c, self.d = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return self.c(torch.cat([y[:, :4], y[:, 4:]], 1)) + self.d(y)

    torch.manual_seed(0)
    net = Net().eval()
    samples = [(torch.randn(1, 3, 8, 8) * (i + 1),) for i in range(3)]
    graph = torch.export.export(net, samples[0], strict=False).module()
    allowed = _quantizable_targets("unet")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    def prepared(skip):
        q = _quantizer(lambda n: n.op != "call_function" or (n.target in allowed and n.name not in skip))
        import copy

        return prepare_pt2e(copy.deepcopy(graph), q)

    def calibrated(gm):
        with torch.no_grad():
            for s in samples:
                gm(*s)
        return gm

    full = calibrated(prepared(set()))
    lent = observers.calibrated_observers(full)
    convs = [n.name for n in graph.graph.nodes if n.op == "call_function" and n.target in allowed]
    partial = [0, 0]
    skips = [{c} for c in convs] + [{convs[0], convs[2]}, {convs[1], convs[3]}]
    for i, skip in enumerate(skips + skips):  # the second round finds every observer lent
        borrowed = prepared(skip)
        missing = observers.reuse(borrowed, lent)
        if missing:  # only those observe while calibrating; the borrowed ones pass values through
            partial[i // len(skips)] += 1
            with observers.calibrating_only(borrowed, missing):
                calibrated(borrowed)
            observers.lend(borrowed, lent)
        mods = borrowed.named_modules(remove_duplicate=False)  # shared instances under every name
        assert not [n for n, m in mods if type(m).__name__ == "HistogramObserver" and m.min_val == float("inf")]
        own = convert_pt2e(calibrated(prepared(skip)))
        borrowed = convert_pt2e(borrowed)
        with torch.no_grad():
            x = torch.randn(1, 3, 8, 8)
            assert torch.equal(own(x), borrowed(x))
    assert partial[0] and not partial[1]  # a concatenation's observer without a twin was calibrated alone, once
    fresh = prepared(set())
    assert sorted(observers.reuse(fresh, {})) == sorted(  # nothing to lend: every observer calibrates
        n for n, m in fresh.named_modules(remove_duplicate=False) if observers._is_observer(m) and "." not in n
    )


def test_executorch_quantizer_without_bn_patterns_annotates_the_same():
    """The converter's XNNPACK quantizer leaves out the conv + batch-norm patterns on a graph without
    batch norm (each costs a pattern trace per annotation); its annotations must equal the stock
    quantizer's, with and without a batch norm in the model (PT2E folds it into the conv first)."""
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from converters.to_executorch import _quantizer

    def annotated(gm) -> list:
        return [
            (n.name, sorted(a.name for a in ann.input_qspec_map), ann.output_qspec is not None)
            for n in gm.graph.nodes
            if (ann := n.meta.get("quantization_annotation")) is not None
        ]

    class Net(torch.nn.Module):
        def __init__(self, bn: bool):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(8).eval() if bn else torch.nn.GroupNorm(2, 8)
            self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.lin(self.up(torch.relu(self.norm(self.conv(x)))))

    x = (torch.randn(1, 4, 8, 8),)
    for bn in (False, True):
        graph = torch.export.export(Net(bn).eval(), x, strict=False).module()
        stock = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        ours = _quantizer(lambda n: True)
        assert annotated(prepare_pt2e(copy.deepcopy(graph), ours)) == annotated(
            prepare_pt2e(copy.deepcopy(graph), stock)
        )
        assert len(ours.SUPPORTED_PATTERNS) < len(XNNPACKQuantizer.SUPPORTED_PATTERNS)  # BN folds into the conv


def test_scores_measured_in_a_second_process_are_the_same_and_cached(cache, monkeypatch):
    """A forkable quantizer in the child process `lower_all` forks: the shortlist's scores are measured
    half in a second process (`converters.parallel.map_apart`); same report and choice, every score cached."""
    import dataclasses

    from converters import parallel

    best1, rep1 = run_pass(_job(), _quantizer([], "a" * 64))
    monkeypatch.setattr(parallel, "_LOWERING_CHILD", True)
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    log: list = []
    best2, rep2 = run_pass(_job(), dataclasses.replace(_quantizer(log, "b" * 64), forkable=True))
    assert best1 == best2 == ("n0", "n1") and rep1 == rep2
    assert len([e for e in log if len(e) == 1]) < rep2["cache"]["scores_measured"] - 1  # some measured elsewhere
    again: list = []
    run_pass(_job(), dataclasses.replace(_quantizer(again, "b" * 64), forkable=True))
    assert again == [("n0", "n1")]  # every score came from the cache
