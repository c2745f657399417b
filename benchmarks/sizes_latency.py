"""Does a bundle of several sizes cost latency at the size a fixed-size bundle has? Measured side by side.

    python -m benchmarks.sizes_latency --fixed BUNDLE --sizes BUNDLE [--runtime onnxruntime] [--runs 30]
        [--threads 1] [--out benchmarks/results]

Both bundles run in one process on one runtime at the fixed bundle's size: per round, one timed
generation on each (the order alternating), so load on the machine falls on both alike. Reported per
component: the median and the fastest round, and their ratios multi-size / fixed; the check is that each
component's fastest-round ratio stays within `LIMIT` (the multi-size bundle at most 5% slower). The
fastest round is judged because on a shared machine the median carries other processes' load (it is
recorded beside it); the whole call's figures add tokenizing, noise and Python, recorded only. Writes
sizes-latency-<runtime>-<cpu class>/result.json and result.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sdxs_edge import cpu
from sdxs_edge.atomic import write_atomic
from sdxs_edge.errors import SDXSError

LIMIT = 1.05
PROMPT = "a large cyan triangle at the bottom left on a black background"
PARTS = ("text_encoder", "unet", "decoder")


def measure(fixed: Path, multi: Path, runtime: str, runs: int, threads: int | None) -> dict:
    """Alternating timed generations of both bundles at the fixed bundle's size; medians and ratios."""
    import runtimes

    opts = {"threads": threads} if threads and runtime in ("onnxruntime", "executorch-native") else {}
    with runtimes.load(fixed, runtime, **opts) as a, runtimes.load(multi, runtime, **opts) as b:
        h, w = a.image_size
        if (w, h) not in b.sizes:
            raise SDXSError(f"{multi} has no size {w}x{h} (it takes {b.sizes}); nothing to compare")
        times: dict[str, dict[str, list[float]]] = {k: {p: [] for p in (*PARTS, "total")} for k in ("fixed", "multi")}
        for s in (a, b):  # warm-up
            s.generate_arrays(PROMPT, seed=0, width=w, height=h)
        for i in range(runs):
            order = [("fixed", a), ("multi", b)] if i % 2 == 0 else [("multi", b), ("fixed", a)]
            for key, s in order:
                t = time.perf_counter()
                res = s.generate_arrays(PROMPT, seed=i, width=w, height=h)
                times[key]["total"].append(time.perf_counter() - t)
                for p in PARTS:
                    times[key][p].append(res.timings[p])
        sizes = [list(x) for x in b.sizes]
    med = {k: {p: 1000 * float(np.median(v)) for p, v in d.items()} for k, d in times.items()}
    best = {k: {p: 1000 * float(np.min(v)) for p, v in d.items()} for k, d in times.items()}
    ratio = {p: best["multi"][p] / best["fixed"][p] for p in best["fixed"]}
    return {
        "runtime": runtime,
        "cpu_class": cpu.host_class(),
        "threads": threads,
        "size": f"{w}x{h}",
        "runs": runs,
        "fixed": {"bundle": str(fixed), "median_ms": med["fixed"], "min_ms": best["fixed"]},
        "multi": {"bundle": str(multi), "sizes": sizes, "median_ms": med["multi"], "min_ms": best["multi"]},
        "ratio_multi_over_fixed": ratio,
        "median_ratio_multi_over_fixed": {p: med["multi"][p] / med["fixed"][p] for p in med["fixed"]},
        "limit": LIMIT,
        "passed": all(ratio[p] <= LIMIT for p in PARTS),
    }


def markdown(r: dict) -> str:
    lines = [
        f"# Fixed-size vs multi-size bundle at {r['size']} ({r['runtime']}, {r['cpu_class']}, threads {r['threads']})",
        "",
        f"Fixed: `{r['fixed']['bundle']}`; multi-size: `{r['multi']['bundle']}` (sizes {r['multi']['sizes']}).",
        f"{r['runs']} alternating rounds in one process; fastest round and median, ms.",
        "",
        "| part | fixed min | multi-size min | multi / fixed (min) | fixed median | multi-size median | multi / fixed (median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    f, m, rm = r["fixed"], r["multi"], r["median_ratio_multi_over_fixed"]
    for p in (*PARTS, "total"):
        lines.append(
            f"| {p} | {f['min_ms'][p]:.2f} | {m['min_ms'][p]:.2f} | {r['ratio_multi_over_fixed'][p]:.3f} "
            f"| {f['median_ms'][p]:.2f} | {m['median_ms'][p]:.2f} | {rm[p]:.3f} |"
        )
    verdict = "within" if r["passed"] else "OVER"
    lines += ["", f"Every component (fastest rounds): {verdict} the {100 * (r['limit'] - 1):.0f}% limit."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixed", required=True, type=Path, help="bundle of one size")
    p.add_argument("--sizes", required=True, type=Path, help="bundle of several sizes (the fixed one's among them)")
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    r = measure(a.fixed, a.sizes, a.runtime, a.runs, a.threads)
    folder = a.out / f"sizes-latency-{a.runtime}-{r['cpu_class']}"
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "result.json", json.dumps(r, indent=2) + "\n")
    write_atomic(folder / "result.md", markdown(r))
    print(markdown(r))
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
