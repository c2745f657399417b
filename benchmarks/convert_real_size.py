"""Conversion cost at real size: time, peak memory and bundle size per target and precision.

    python -m benchmarks.convert_real_size                      # sdxs-512 at 512x512 (tens of minutes)
    python -m benchmarks.convert_real_size --preset tiny        # smoke run in about a minute

Each conversion runs in its own process so its peak RSS (from wait4's rusage) is its own. Results go to
benchmarks/results/conversion_<preset>.json and .md (e.g. conversion_sdxs512.json); bundles are written
under --work and deleted unless --keep-bundles. int8 conversions run with the sensitivity cache off, so
each measures every score as a first conversion of the model does (--keep-sensitivity-cache: reuse).
A conversion that fails (e.g. a ParityError) is recorded with its one-line error and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from sdxs_edge import cpu
from sdxs_edge.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JOBS = ("onnx:fp32", "onnx:int8", "executorch:fp32", "executorch:int8", "coreml:fp16")


def _dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worker(args: argparse.Namespace) -> int:
    """Child process: one conversion; prints one JSON line (the manifest's figures or the error)."""
    sys.path.insert(0, str(ROOT))
    from converters import convert
    from sdxs_edge.errors import SDXSError

    try:
        from benchmarks.jobs import PRESET_SENSITIVITY  # presets carry random weights, as in benchmarks.bench

        out = convert(
            args.preset,
            args.target,
            args.precision,
            args.bundle,
            resolution=args.resolution,
            overwrite=True,
            progress=False,
            onnx_calibration=args.onnx_calibration,
            **PRESET_SENSITIVITY,
        )
    except SDXSError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 2
    m = json.loads((out / "manifest.json").read_text())
    comps = {
        n: {"file": c["file"], "mb": round(_dir_bytes(out / c["file"]) / 1e6, 2)} for n, c in m["components"].items()
    }
    parity = {n: p.get("snr_db", p.get("checked")) for n, p in m["parity"]["components"].items()}
    sens = {n: ((c.get("int8") or {}).get("sensitivity") or {}) for n, c in m["conversion"]["components"].items()}
    print(
        json.dumps(
            {
                "conversion_seconds": m["conversion"]["seconds"],
                "stage_seconds": m["conversion"]["stage_seconds"],
                "components": comps,
                "snr_db": parity,
                "image_psnr_db": m["parity"]["end_to_end"].get("image_psnr_db"),
                "e2e_images": m["parity"]["end_to_end"].get("images", 0),
                "parity_checked": m["parity"]["checked"],
                "sensitivity_scores": {n: v["cache"] for n, v in sens.items() if v.get("cache")},
            }
        )
    )
    return 0


def run_one(target: str, precision: str, args: argparse.Namespace) -> dict:
    bundle = Path(args.work) / f"{args.preset}-{target}-{precision}"
    cmd = [
        sys.executable,  # as a module: a script's folder first on sys.path would shadow the stdlib `profile`
        "-m",
        "benchmarks.convert_real_size",
        "--worker",
        "--preset",
        args.preset,
        "--target",
        target,
        "--precision",
        precision,
        "--bundle",
        str(bundle),
    ]
    cmd += ["--onnx-calibration", args.onnx_calibration]
    if args.resolution:
        cmd += ["--resolution", str(args.resolution)]
    log_out, log_err = bundle.with_name(bundle.name + ".stdout"), bundle.with_name(bundle.name + ".stderr")
    t = time.perf_counter()
    # Output goes to files, not pipes: the libraries log a lot and a full pipe would block the child.
    env = dict(os.environ)
    if not args.keep_sensitivity_cache:  # every score measured, as in a first conversion of the model
        env["SDXS_EDGE_SENSITIVITY_CACHE"] = "off"
    with log_out.open("w") as fo, log_err.open("w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS, not the parent's
    wall = time.perf_counter() - t
    code = proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen
    stdout, stderr = log_out.read_text(), log_err.read_text()
    log_out.unlink()
    row = {
        "target": target,
        "precision": precision,
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "sensitivity_cache": "kept" if args.keep_sensitivity_cache else "off",
    }
    if target == "onnx" and precision == "int8":
        row["onnx_calibration"] = args.onnx_calibration
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        row["error"] = (
            f"worker exited {code}: {(stderr.strip().splitlines() or ['no output'])[-1][:300]} (log: {log_err})"
        )
        return row
    log_err.unlink()
    row.update(json.loads(lines[-1]))
    if "error" not in row:
        row["bundle_mb"] = round(_dir_bytes(bundle) / 1e6, 2)
        if not args.keep_bundles:
            import shutil

            shutil.rmtree(bundle, ignore_errors=True)
    return row


def markdown(report: dict) -> str:
    h = report["host"]
    lines = [
        f"# Conversion cost: {report['preset']} at {report['resolution'] or 'its own'} resolution",
        "",
        f"Host: {h['platform']}, {h['cpus']} CPUs, CPU class {h.get('cpu_class', 'not recorded')}, Python {h['python']}. Each conversion ran in its own process; peak RSS is that process's.",
        "",
        "SNR per component and end-to-end image PSNR are against PyTorch on the conversion's own parity inputs; 'exact' means no error at all.",
        "",
        "Presets carry random weights, so the int8 sensitivity pass is kept short here (3 nodes re-scored one by one, at most 2% "
        "of the nodes kept in float); int8 accuracy proper is judged on the trained shapes model. Unless a row says "
        "'cache kept', its sensitivity pass measured every score (its cache off, as in a first conversion).",
        "",
        "| target | precision | wall s | convert s | peak RSS MB | bundle MB | text_encoder | unet | decoder | image PSNR dB | check |",
        "|---|---|---:|---:|---:|---:|---|---|---|---:|---|",
    ]
    for r in report["results"]:
        snr = r.get("snr_db", {})

        def cell(c, snr=snr):
            v = snr.get(c)
            return (
                "-"
                if v is None and c not in snr
                else ("exact" if v is None else (f"{v:.1f} dB" if isinstance(v, (int, float)) else str(v)))
            )

        psnr = r.get("image_psnr_db")
        psnr_cell = ("exact" if r.get("e2e_images") else "-") if psnr is None else f"{psnr:.1f}"
        lines.append(
            f"| {r['target']} | {r['precision']} | {r['wall_seconds']} | {r.get('conversion_seconds', '-')} | {r['peak_rss_mb']} | {r.get('bundle_mb', '-')} | "
            f"{cell('text_encoder')} | {cell('unet')} | {cell('decoder')} | {psnr_cell} | {r.get('error', r.get('parity_checked', ''))}"
            f"{', cache kept' if r.get('sensitivity_cache') == 'kept' else ''} |"
        )
    if report.get("notes"):
        lines += [""] + [n for note in report["notes"] for n in (note, "")][:-1]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sys.path.insert(0, str(ROOT))
    from converters.registry import ONNX_CALIBRATIONS

    p.add_argument("--preset", default="sdxs-512", help="model preset (default sdxs-512)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the preset's)")
    p.add_argument("--jobs", default=",".join(DEFAULT_JOBS), help="comma-separated target:precision pairs")
    p.add_argument("--work", default=str(ROOT / "out" / "bench-convert"), help="where bundles are written")
    p.add_argument(
        "--results", default=str(ROOT / "benchmarks" / "results"), help="folder for conversion_<preset>.json and .md"
    )
    p.add_argument("--keep-bundles", action="store_true", help="keep the bundles under --work")
    keep = "let int8 conversions reuse scores of earlier runs (default: the cache is off, as in a first conversion)"
    p.add_argument("--keep-sensitivity-cache", action="store_true", help=keep)
    from benchmarks.jobs import PRESET_ONNX_CALIBRATION

    p.add_argument(
        "--onnx-calibration",
        choices=ONNX_CALIBRATIONS,
        default=PRESET_ONNX_CALIBRATION,
        help=f"ONNX int8 activation ranges (default {PRESET_ONNX_CALIBRATION}, as benchmarks.bench converts presets)",
    )
    p.add_argument("--merge", action="store_true", help="replace only the rows of --jobs in an existing results file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    jobs = [j.split(":") for j in args.jobs.split(",") if j.strip()]
    if any(len(j) != 2 for j in jobs):
        p.error(f"--jobs takes target:precision pairs, got {args.jobs!r}")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = []
    for target, precision in jobs:
        print(f"converting {args.preset} -> {target}/{precision} ...", flush=True)
        row = run_one(target, precision, args)
        print(
            "  "
            + (
                row["error"]
                if "error" in row
                else f"{row['wall_seconds']} s, peak {row['peak_rss_mb']} MB, bundle {row['bundle_mb']} MB"
            ),
            flush=True,
        )
        results.append(row)
    import torch

    report = {
        "preset": args.preset,
        "resolution": args.resolution,
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "cpu_class": cpu.host_class(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "results": results,
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"conversion_{args.preset.replace('-', '').replace('.', '')}"
    if args.merge and (out / f"{stem}.json").is_file():  # keep the earlier rows of other target/precision pairs
        done = {(r["target"], r["precision"]) for r in results}
        old = json.loads((out / f"{stem}.json").read_text())
        report["results"] = [r for r in old["results"] if (r["target"], r["precision"]) not in done] + results
        order = {j: i for i, j in enumerate(DEFAULT_JOBS)}
        report["results"].sort(key=lambda r: order.get(f"{r['target']}:{r['precision']}", len(order)))
        if old.get("notes"):
            report["notes"] = old["notes"]
    write_atomic(out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / f"{stem}.md", markdown(report))
    print(f"wrote {out / stem}.json and .md")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
