"""An ExecuTorch bundle through the native runner on this machine, no PyTorch in the process:
`python -m benchmarks.native_runner BUNDLE [--runs 5] [--out DIR]`.

The Python runtime of ExecuTorch links libtorch, so its process carries 356 MB of imports (torch 219 MB,
the bindings 137 MB) before any weights: the sdxs-512 int8 path peaks at 2.2x its bundle under
`benchmarks.bench`. This measures the same .pte files in `runtimes/native/runner.cpp` built for this
machine (`make host-runner`). Each component runs in its own runner process (`--warmup 1 --iters N`, the
runner's own timing of `Method::execute`) on random inputs of the manifest's shapes, and its peak RSS is
the runner's own VmHWM, which it prints (a parent's rusage of the child would include the parent's
high-water mark, carried in at exec). The runner sizes ExecuTorch's threadpool to the machine's cores.

Reported per component: load ms, run median / p90 / min ms, peak RSS MB; then the sum of the component
medians (one image without tokenizer and sampler, which take well under a millisecond), and two memory
figures for one process holding all three programs: the largest single component (lower bound) and the
sum of the three (upper bound: it counts the runtime libraries three times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.jobs import dir_mb, stats_ms
from sdxs_edge.atomic import write_atomic
from sdxs_edge.errors import SDXSError

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "build" / "host" / "sdxs_runner"


def _run_component(pte: Path, specs: list[dict], runs: int, io: Path) -> dict:
    from benchmarks.profile import random_inputs
    from runtimes.native_io import failure_line, parse_timing, write_inputs

    io.mkdir(parents=True, exist_ok=True)
    write_inputs(io, random_inputs(specs, np.random.default_rng(0)))
    cmd = [str(RUNNER), "--model", str(pte), "--io", str(io), "--warmup", "1", "--iters", str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SDXSError(f"the native runner failed on {pte.name}: {failure_line(proc.stderr, proc.returncode)}")
    timing = parse_timing(proc.stdout)
    if timing.get("peak_rss_kb", -1) < 0:
        raise SDXSError(
            f"the runner at {RUNNER} reports no peak RSS (no /proc/self/status here, or an older build: run 'make host-runner')"
        )
    stats = stats_ms([ms / 1000 for ms in timing["run_ms"]])
    return {
        "load_ms": timing["load_ms"],
        **{k: stats[k] for k in ("median_ms", "p90_ms", "min_ms")},
        "samples_ms": timing["run_ms"],
        "peak_rss_mb": round(timing["peak_rss_kb"] / 1024, 1),
    }


def measure(bundle: str | Path, runs: int = 5) -> dict:
    """Per-component figures of an ExecuTorch (XNNPACK) bundle under the host native runner."""
    from sdxs_edge.bundle import load_manifest

    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    if (
        manifest["target"] != "executorch"
        or manifest.get("conversion", {}).get("config", {}).get("delegate", "xnnpack") != "xnnpack"
    ):
        raise SDXSError(f"{bundle} is not an ExecuTorch XNNPACK bundle")
    if not RUNNER.is_file():
        raise SDXSError(f"no host runner at {RUNNER}: run 'make host-runner'")
    if runs < 1:
        raise SDXSError("--runs must be at least 1")
    comps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, entry in manifest["components"].items():
            comps[name] = _run_component(bundle / entry["file"], entry["inputs"], runs, Path(tmp) / name)
    rss = [c["peak_rss_mb"] for c in comps.values()]
    bundle_mb = dir_mb(bundle)
    return {
        "bundle": str(bundle),
        "precision": manifest["precision"],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": "the runner's default: one per core",
        },
        "runs": runs,
        "components": comps,
        "sum_of_medians_ms": round(sum(c["median_ms"] for c in comps.values()), 2),
        "bundle_mb": bundle_mb,
        "peak_rss_mb": {"largest_component": max(rss), "sum_of_components": round(sum(rss), 1)},
        "peak_rss_over_bundle": {
            "largest_component": round(max(rss) / bundle_mb, 3),
            "sum_of_components": round(sum(rss) / bundle_mb, 3),
        },
    }


def render(r: dict) -> str:
    lines = [
        f"# Native runner: {r['bundle']} ({r['precision']}, {r['machine']['cores']} cores, {r['runs']} runs after 1 warm-up)",
        "",
        "| component | load ms | run ms (median / p90 / min) | peak RSS MB |",
        "|---|---:|---:|---:|",
    ]
    for name, c in r["components"].items():
        lines.append(
            f"| {name} | {c['load_ms']:.1f} | {c['median_ms']:.1f} / {c['p90_ms']:.1f} / {c['min_ms']:.1f} | {c['peak_rss_mb']:.0f} |"
        )
    p, q = r["peak_rss_mb"], r["peak_rss_over_bundle"]
    lines += [
        "",
        f"- Sum of the component medians: **{r['sum_of_medians_ms']:.1f} ms** per image.",
        f"- Bundle {r['bundle_mb']:.1f} MB. One process holding all three programs would peak between {p['largest_component']:.0f} MB "
        f"({q['largest_component']:.2f}x the bundle) and {p['sum_of_components']:.0f} MB ({q['sum_of_components']:.2f}x; this bound counts the runtime libraries three times).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.native_runner", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=None, help="write native-runner.json and native-runner.md here")
    a = p.parse_args(argv)
    try:
        r = measure(a.bundle, a.runs)
    except SDXSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = render(r)
    print(text, end="")
    if a.out:
        write_atomic(Path(a.out) / "native-runner.json", json.dumps(r, indent=1))
        write_atomic(Path(a.out) / "native-runner.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
