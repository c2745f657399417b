"""Conversion time, before and after a change to the converter, measured side by side in one run.

    python -m benchmarks.conversion_time --before REV [--targets executorch,onnx] [--model sdxs_edge/default_model]

Each conversion (int8) runs in its own process: the sources of commit REV (`git archive`, run from a
temporary folder with this checkout's virtualenv) and then this checkout's, each with an empty
sensitivity cache ("cold"), and this checkout's once more on the cache the cold run filled ("warm").
Recorded per run: wall seconds of the process, the manifest's stage seconds, per-component SNR against
PyTorch, the sensitivity pass's steps and the nodes it kept in float, the sha256 of each component file
(from the manifest; the table says whether they equal the "before" run's), and the load average beside
it (the machine may be shared). Writes conversion-time-<cpu class>.json and .md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from sdxs_edge import cpu
from sdxs_edge.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[1]


def _sources_of(rev: str, into: Path) -> Path:
    """The tree of commit `rev` unpacked into `into` (the model folder comes from this checkout)."""
    archive = into / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev], stdout=f, check=True)
    with tarfile.open(archive) as t:
        t.extractall(into / "src", filter="data")
    return into / "src"


def _convert(src: Path, model: str, target: str, out: Path, cache: Path) -> dict:
    """One conversion in a fresh process; its wall seconds and the manifest's figures."""
    env = {**os.environ, "PYTHONPATH": str(src), "SDXS_EDGE_CACHE": str(cache)}
    env.pop("SDXS_EDGE_SENSITIVITY_CACHE", None)
    code = (
        "import sys; from converters import convert; "
        "convert(sys.argv[1], sys.argv[2], 'int8', sys.argv[3], overwrite=True, progress=False)"
    )
    load0, t = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, model, target, str(out)], cwd=src, env=env, capture_output=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"status": "failed", "wall_s": round(wall, 1), "error": proc.stderr.decode()[-600:]}
    m = json.loads((out / "manifest.json").read_text())
    sens = {}
    for name, rep in m["conversion"]["components"].items():
        s = (rep.get("int8") or {}).get("sensitivity") or {}
        sens[name] = {
            "steps": s.get("steps"),
            "kept_in_float": [e["name"] for e in s.get("excluded_nodes", [])],
            "cache": s.get("cache"),
        }
    return {
        "status": "ok",
        "wall_s": round(wall, 1),
        "sha256": {name: c["sha256"] for name, c in m["components"].items()},
        "stage_seconds": m["conversion"]["stage_seconds"],
        "snr_db": {n: c.get("snr_db") for n, c in m["parity"]["components"].items()},
        "image_psnr_db": m["parity"]["end_to_end"].get("image_psnr_db"),
        "sensitivity": sens,
        "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }


def _same_bytes(run: dict, runs: list[dict]) -> str:
    """Whether a run's files equal those of the "before" run of its target."""
    before = next((r for r in runs if r["target"] == run["target"] and r["run"] == "before"), None)
    if run["run"] == "before" or not before or before.get("status") != "ok":
        return "-"
    return "yes" if run.get("sha256") == before.get("sha256") else "no"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown"
    )


def measure(before: str, model: str, targets: list[str]) -> dict:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        old = _sources_of(before, Path(tmp))
        model_path = str((ROOT / model).resolve()) if (ROOT / model).exists() else model
        for target in targets:
            for label, src, cache in (
                ("before", old, Path(tmp) / "cache-before"),
                ("after, cold cache", ROOT, Path(tmp) / "cache-after"),
                ("after, warm cache", ROOT, Path(tmp) / "cache-after"),
            ):
                r = _convert(src, model_path, target, Path(tmp) / f"out-{target}", cache)
                runs.append({"target": target, "run": label, **r})
                print(json.dumps(runs[-1]), flush=True)
    return {
        "what": "int8 conversion time of one model, the converter of commit `before` and this one side by side",
        "model": model,
        "before": before,
        "after": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "cpu_model": _cpu_model(),
        "cpu_class": cpu.host_class(),
        "cores": os.cpu_count(),
        "runs": runs,
    }


def markdown(res: dict) -> str:
    lines = [
        f"# int8 conversion time: {res['model']} on {res['cpu_class']} ({res['cores']} cores)",
        "",
        f"From `conversion-time-{res['cpu_class']}.json` (`python -m benchmarks.conversion_time`); before = commit "
        f"`{res['before'][:10]}`, after = `{res['after'][:10]}` (the checkout it ran from, with its uncommitted changes).",
        "",
        "| target | run | wall s | stage seconds | SNR dB (per component) | kept in float | scores reused / measured | files as before | load avg (start, end) |",
        "|---|---|---:|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        if r["status"] != "ok":
            lines.append(f"| {r['target']} | {r['run']} | {r['wall_s']} | failed | | | | | |")
            continue
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items())
        snr = ", ".join(f"{k} {v:.2f}" for k, v in r["snr_db"].items() if v is not None)
        kept = "; ".join(f"{k}: {len(v['kept_in_float'])}" for k, v in r["sensitivity"].items() if v["steps"])
        cache = "; ".join(
            f"{k}: {v['cache']['scores_reused']}/{v['cache']['scores_measured']}"
            for k, v in r["sensitivity"].items()
            if v.get("cache")
        )
        lines.append(
            f"| {r['target']} | {r['run']} | {r['wall_s']} | {stages} | {snr} | {kept} | {cache or '-'} "
            f"| {_same_bytes(r, res['runs'])} | {r['load_average_1min']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the commit to compare against")
    p.add_argument("--model", default="sdxs_edge/default_model")
    p.add_argument("--targets", default="executorch,onnx")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    res = measure(args.before, args.model, args.targets.split(","))
    stem = args.out / f"conversion-time-{res['cpu_class']}"
    write_atomic(stem.with_suffix(".json"), json.dumps(res, indent=2) + "\n")
    write_atomic(stem.with_suffix(".md"), markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
