"""Per-layer int8 sensitivity: find the nodes whose quantization hurts most and keep them in float.

Shared by the ONNX (QDQ) and ExecuTorch (PT2E) int8 paths. In the fully quantized model every activation
tensor that passes through a quantize/dequantize pair is re-quantized offline with the calibrated scale
and zero point, on the float model's own values for the same inputs, and scored by its local SNR:

    SNR_q(x) = 10 log10( sum x^2 / sum (x - dq(q(x)))^2 )     (over entries below 1e30 in magnitude)

Each quantized node gets the worst SNR_q among the tensors it quantizes (its inputs and the outputs it
hands on quantized). A softmax whose input range is blown up by an attention mask's -3.4e38 fill scores
about 0 dB or worse; a well-behaved conv 35-45 dB. Nodes are then kept in float in that order, doubling
the count (1, 2, 4, ...) until the component reaches the registry's sensitivity target or the budget is
spent; the best model seen is kept. The score is local (upstream-independent), so one pass ranks all.

`run_pass` is the entry point of both backends: it keeps every score it measures in the on-disk cache
of `converters.sensitivity_cache` and takes the ones a conversion of the same model measured before
from there, so a second conversion quantizes and scores nothing but the model it keeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converters.parity import tensor_snr
from converters.sensitivity_cache import Entry, cache_dir

MASK_MAGNITUDE = 1e30  # attention-mask fill values (finfo.min, -inf) are not signal


@dataclass(frozen=True)
class QParams:
    """Per-tensor affine quantization: q = clip(round(x / scale) + zero_point, qmin, qmax)."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def fake_quant(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):  # a blown-up range (inf / nan scale) is exactly what we look for
            q = np.clip(np.round(np.asarray(x, np.float64) / self.scale) + self.zero_point, self.qmin, self.qmax)
            return (q - self.zero_point) * self.scale


@dataclass(frozen=True)
class QuantNode:
    """A node of the quantized graph and the activation tensors it quantizes (by their float names)."""

    name: str
    tensors: tuple[str, ...]


def local_snr(values: Sequence[np.ndarray], qp: QParams) -> float:
    """SNR in dB of one tensor re-quantized with its calibrated parameters (mask fills excluded)."""
    ref = [np.where(np.abs(v) < MASK_MAGNITUDE, v, 0.0) for v in values]
    return tensor_snr(ref, [qp.fake_quant(r) for r in ref])


def score_nodes(
    nodes: Sequence[QuantNode], values: Mapping[str, Sequence[np.ndarray]], qparams: Mapping[str, QParams]
) -> list[tuple[str, float]]:
    """(node name, worst local SNR_q in dB of its quantized tensors), worst first.

    Args:
        nodes: the quantized nodes.
        values: float activations per tensor name (from the float model on calibration samples).
        qparams: calibrated quantization parameters per tensor name.
    """
    cache: dict[str, float] = {}
    scored = []
    for n in nodes:
        snrs = []
        for t in n.tensors:
            if t in values and t in qparams:
                if t not in cache:
                    cache[t] = local_snr(values[t], qparams[t])
                snrs.append(cache[t])
        if snrs:
            scored.append((n.name, min(snrs)))
    scored.sort(key=lambda s: (s[1], s[0]))
    return scored


@dataclass
class Search:
    """Outcome of the greedy exclusion: what was kept in float and the SNR at each step."""

    excluded: list[tuple[str, float]] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    best: Any = None
    best_snr_db: float = float("-inf")

    def report(self, candidates: int, target_db: float) -> dict:
        return {
            "method": "local re-quantization SNR per tensor, worst nodes kept in float 1, 2, 4, ... until the target",
            "target_snr_db": target_db,
            "quantized_candidates": candidates,
            # JSON has no infinities: a tensor destroyed by quantization (-inf dB) is written as -999.
            "excluded_nodes": [
                {"name": n, "quant_snr_db": round(d, 2) if math.isfinite(d) else (-999.0 if d < 0 else None)}
                for n, d in self.excluded
            ],
            "steps": self.steps,
        }


# A step of `greedy_exclude` that misses the target keeps more nodes in float only for at least this gain:
# each node kept in float runs at float speed (one linear of the sdxs-512 U-Net: +7.6 ms for 0.03 dB).
MIN_GAIN_DB = 0.1


def greedy_exclude(
    ranked: Sequence[tuple[str, float]],
    evaluate: Callable[[list[str]], tuple[float, Any]],
    first: tuple[float, Any],
    target_db: float,
    max_excluded: int,
) -> Search:
    """Keep the worst-ranked nodes in float, 1, 2, 4, ... of them, until `target_db` is met. A step is
    kept if it meets the target, or else if it gains at least `MIN_GAIN_DB` over the best so far.

    Args:
        ranked: `score_nodes` output, worst first.
        evaluate: excluded node names -> (component SNR dB, quantized artifact).
        first: (SNR, artifact) of the fully quantized model.
        target_db: stop once the component SNR reaches this.
        max_excluded: never keep more than this many nodes in float.
    """
    s = Search(best=first[1], best_snr_db=first[0])
    s.steps.append({"excluded": 0, "snr_db": round(first[0], 3)})
    k, limit = 0, min(max_excluded, len(ranked))
    while s.best_snr_db < target_db and k < limit:
        k = min(max(1, 2 * k), limit)
        snr, artifact = evaluate([n for n, _ in ranked[:k]])
        s.steps.append({"excluded": k, "snr_db": round(snr, 3)})
        if snr > s.best_snr_db and (snr >= target_db or snr >= s.best_snr_db + MIN_GAIN_DB):
            s.best, s.best_snr_db, s.excluded = artifact, snr, list(ranked[:k])
    return s


def split_calibration(job) -> tuple[Sequence, Sequence, Sequence]:
    """(samples that set the int8 ranges, held-out inputs and references the sensitivity pass scores on).

    The pass scores on `sensitivity_samples` calibration samples held out of the ranges: ranges fitted on
    the very samples they are scored on flatter the int8 model (a real-size U-Net scored 28 dB in-sample
    and 24.9 dB on the parity inputs, so the pass kept nothing in float). The held-out samples are spread
    evenly over the list (`held_out_indices`), so with several image sizes, whose samples follow one
    another, every size is scored, and several prompts are. With too few samples to spare, both use all
    of them. The pass judges a candidate by its worst held-out sample (`min_sample_snr_db`), not the mean:
    the conversion check that follows judges other inputs, and a mean hides the one that quantizes badly.
    """
    n = max(1, min(job.config.sensitivity_samples, len(job.calib)))
    if len(job.calib) <= n:
        return job.calib, job.calib[:n], job.calib_ref[:n]
    held = held_out_indices(len(job.calib), n)
    skip = set(held)
    fit = [x for i, x in enumerate(job.calib) if i not in skip]
    return fit, [job.calib[i] for i in held], [job.calib_ref[i] for i in held]


def held_out_indices(total: int, n: int) -> list[int]:
    """`n` of `total` sample indices spread evenly, every other one moved on by one when there is room.

    Calibration interleaves a text-to-image and an image-to-image U-Net (and decoder) sample per prompt
    in a bundle with an encoder, so an even stride alone would hold out only one kind; the shift holds out
    both. E.g. (64, 4) -> [0, 17, 32, 49]; with three sizes of 22, 22 and 20 samples that is each size,
    and both kinds.
    """
    if not 1 <= n < total:
        raise ValueError(f"need 1 <= n < total, got n={n}, total={total}")
    shift = total >= 2 * n
    return [j * total // n + (j % 2 if shift else 0) for j in range(n)]


def keep_sensitive_in_float(
    job,
    candidates: Sequence[QuantNode],
    rank: Callable[[], Sequence[tuple[str, float]]],
    evaluate: Callable[[list[str]], tuple[float, Any]],
    first: tuple[float, Any],
    scores: Callable[[list[list[str]]], list[float]] | None = None,
) -> tuple[Any, dict | None]:
    """The sensitivity pass both int8 backends run: (best artifact, manifest report or None when off).

    Args:
        job: the component job (its config switches the pass and bounds the float share; its
            precision spec holds the target SNR).
        candidates: the quantized nodes of the fully quantized artifact.
        rank: computes `score_nodes(...)` for the candidates (only called when the pass runs).
        evaluate: excluded node names -> (component SNR dB, quantized artifact).
        first: (SNR, artifact) of the fully quantized model.
        scores: several exclusion lists -> their SNRs, for the nodes re-scored one by one
            (`rank_by_exclusion`); default: `evaluate` on each.
    """
    target = job.spec.sensitivity_target_db
    if not job.config.sensitivity or target is None:
        return first[1], None
    target += dict(job.config.sensitivity_target_offset_by_component).get(job.name, 0.0)
    fraction = dict(job.config.max_excluded_fraction_by_component).get(job.name, job.config.max_excluded_fraction)
    budget = max(1, int(fraction * len(candidates)))
    if first[0] >= target:
        search = greedy_exclude([], evaluate, first, target, 0)
        return search.best, search.report(len(candidates), target)
    local = rank()
    shortlist = _shortlist(candidates, local, job.config.sensitivity_shortlist, {spec.name for spec in job.inputs})
    ranked = rank_by_exclusion(shortlist, evaluate, first[0], scores)
    helpful = {n for n, _ in ranked}
    ranked += [(n, d) for n, d in local if n not in helpful]  # then the rest, worst local SNR first
    search = greedy_exclude(ranked, evaluate, first, target, budget)
    rep = search.report(len(candidates), target)
    rep["method"] = (
        f"shortlist of {len(shortlist)} nodes (the component's first and last quantized nodes, then the worst by local "
        "re-quantization SNR); each kept in float alone and the component re-scored; the most helpful kept in float "
        "1, 2, 4, ... until the target or the budget"
    )
    rep["budget_nodes"] = budget
    rep["excluded_nodes"] = [
        {"name": n, "snr_db_with_it_alone_in_float": round(-d, 2)}
        if n in helpful
        else {"name": n, "quant_snr_db": round(d, 2) if math.isfinite(d) else -999.0}
        for n, d in search.excluded
    ]
    return search.best, rep


def _shortlist(
    candidates: Sequence[QuantNode], local: Sequence[tuple[str, float]], limit: int, input_names: set[str]
) -> list[QuantNode]:
    """Up to `limit` candidates worth an output-referred score: all of them when few; else the nodes that
    quantize a component input and the last two in graph order (where the component's input and output
    pass through int8: the one-step rule multiplies the U-Net output's error by sigma), then the worst by
    local SNR."""
    if len(candidates) <= limit:
        return list(candidates)
    by_name = {c.name: c for c in candidates}
    first = [c for c in candidates if input_names & set(c.tensors)] or list(candidates[:2])
    picked = []
    for c in [*first, *candidates[-2:]]:
        if c not in picked:
            picked.append(c)
    for name, _ in local:
        if len(picked) >= limit:
            break
        if by_name[name] not in picked:
            picked.append(by_name[name])
    return picked[:limit]


def rank_by_exclusion(
    candidates: Sequence[QuantNode],
    evaluate: Callable[[list[str]], tuple[float, Any]],
    base_db: float,
    scores: Callable[[list[list[str]]], list[float]] | None = None,
) -> list[tuple[str, float]]:
    """Rank nodes by the component score with that node alone kept in float (best first).

    Output-referred, unlike the local ranking: it finds the node whose small local error a later layer
    (or the one-step rule) amplifies. One quantize-and-score per candidate, so it runs for small
    components only (`ConversionConfig.sensitivity_shortlist`). Returns (name, -score) sorted ascending,
    the `greedy_exclude` order; nodes that do not beat the fully quantized score are dropped. `scores`
    measures the candidates all at once (`_Evaluations.many`); default: `evaluate` one after another.
    """
    alone = [[n.name] for n in candidates]
    snrs = scores(alone) if scores is not None else [evaluate(x)[0] for x in alone]
    scored = []
    for n, snr in zip(candidates, snrs):
        if snr > base_db + 0.05:
            scored.append((n.name, -snr))
    scored.sort(key=lambda s: (s[1], s[0]))
    return scored


def refusal_detail(report: dict) -> str:
    """One clause on what the int8 sensitivity pass saw, for the error of a conversion its check refuses.

    A refused bundle is never written, so its manifest cannot say why the pass kept what it kept."""
    for rep in report.values() if isinstance(report, dict) else ():
        sens = rep.get("sensitivity") if isinstance(rep, dict) else None
        if not sens or not sens.get("steps"):
            continue
        first, last = sens["steps"][0], sens["steps"][-1]
        return (
            f"; the int8 sensitivity pass scored {first['snr_db']:.1f} dB on its held-out samples with every node "
            f"quantized and {last['snr_db']:.1f} dB with {last['excluded']} of {sens['quantized_candidates']} kept in float "
            f"(target {sens['target_snr_db']:.0f} dB)"
        )
    return ""


@dataclass(frozen=True)
class Quantizer:
    """What a backend hands `run_pass`.

    Args:
        quantize: node names kept in float -> the quantized artifact.
        score: artifact -> the component's SNR in dB on the held-out samples (`min_sample_snr_db`).
        candidates: the fully quantized artifact -> its quantized nodes.
        rank: (fully quantized artifact, candidates) -> `score_nodes` of them.
        key: `sensitivity_cache.content_key` of the float model, samples and references.
        forkable: `quantize` and `score` touch no file and no state another process needs, so several
            scores may be measured in a forked process (`converters.parallel.map_apart`).
    """

    quantize: Callable[[list[str]], Any]
    score: Callable[[Any], float]
    candidates: Callable[[Any], list[QuantNode]]
    rank: Callable[[Any, Sequence[QuantNode]], list[tuple[str, float]]]
    key: str
    forkable: bool = False


class _Evaluations:
    """evaluate(excluded) -> (SNR, artifact): the cached score and no artifact when the entry has it,
    else quantized, scored and cached; the fully quantized artifact is kept for the ranking."""

    def __init__(self, q: Quantizer, entry: Entry):
        self.q, self.entry, self.runs, self.full = q, entry, 0, None

    def __call__(self, excluded: list[str]) -> tuple[float, Any]:
        snr = self.entry.score(excluded)
        if snr is not None:
            return snr, None
        artifact = self.q.quantize(list(excluded))
        snr = self._measured(excluded, float(self.q.score(artifact)))
        if not excluded:
            self.full = artifact
        return snr, artifact

    def _measured(self, excluded: list[str], snr: float) -> float:
        """Counts and caches a score measured now."""
        self.runs += 1
        self.entry.put_score(excluded, snr)
        return snr

    def many(self, todo: list[list[str]]) -> list[float]:
        """The scores of several exclusion lists: cached ones from the cache, the rest measured, half of
        them in a second process where the quantizer allows it (`converters.parallel.map_apart`)."""
        from converters.parallel import map_apart

        if not self.q.forkable:
            return [self(x)[0] for x in todo]
        known = [self.entry.score(x) for x in todo]
        missing = [x for x, snr in zip(todo, known) if snr is None]
        measured = map_apart(lambda x: float(self.q.score(self.q.quantize(list(x)))), missing)
        fresh = iter([self._measured(x, snr) for x, snr in zip(missing, measured)])
        return [snr if snr is not None else next(fresh) for snr in known]

    def fully_quantized(self) -> Any:
        if self.full is None:
            self.full = self.q.quantize([])
        return self.full

    def cached(self, field: str, compute: Callable[[], Any]) -> Any:
        value = self.entry.get(field)
        if value is None:
            value = compute()
            self.entry.put(field, value)
        return value


def run_pass(job, q: Quantizer) -> tuple[Any, dict | None]:
    """The fully quantized artifact when the pass is off, else `keep_sensitive_in_float` through the
    cache: (the artifact kept, its report with "cache": scores reused and measured)."""
    if not job.config.sensitivity or job.spec.sensitivity_target_db is None:
        return q.quantize([]), None
    ev = _Evaluations(q, Entry(cache_dir(), job.name, q.key))
    first = ev([])
    cands = ev.cached("candidates", lambda: [[n.name, list(n.tensors)] for n in q.candidates(ev.fully_quantized())])
    candidates = [QuantNode(n, tuple(t)) for n, t in cands]

    def rank() -> list[tuple[str, float]]:
        ranked = ev.cached("local_ranking", lambda: [list(r) for r in q.rank(ev.fully_quantized(), candidates)])
        return [(n, float(d)) for n, d in ranked]

    best, rep = keep_sensitive_in_float(job, candidates, rank, ev, first, ev.many)
    if best is None:  # its score came from the cache: quantize it now (the conversion check judges it anew)
        best = q.quantize([e["name"] for e in rep["excluded_nodes"]]) if rep["excluded_nodes"] else ev.fully_quantized()
    rep["cache"] = {"scores_reused": ev.entry.hits, "scores_measured": ev.runs}
    return best, rep
