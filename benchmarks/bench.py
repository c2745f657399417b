"""`run_bench`: every runtime x precision path of one model, and its baselines, measured in one run on
one machine; JSON, markdown and a chart written atomically under the output folder.

    python -m benchmarks.bench sdxs-512 --resolution 512 --runs 3      # the real-size run (long)
    python -m benchmarks.bench tiny --resolution 64 --runs 3           # smoke run
    sdxs-edge bench MODEL_OR_PRESET [--runtimes ...] [--precisions ...] ...   (same flags)

Order of work: convert every bundle needed (one converter process, each conversion timed in process),
then measure each path in a fresh process (`benchmarks.worker`): load time, a cold first run, then
median / p90 per component and end to end over `runs` runs after `warmup`, and that process's peak RSS
(its own VmHWM). Baselines in the same run: torch eager fp32 of the same model, the teacher
architecture (default sd21-base, random weights) at 1 and `teacher_steps` steps with classifier-free
guidance (per component, U-Net time per evaluation x evaluations), and OpenVINO fp32 / NNCF int8 on the
same components when the `bench` extra is installed (a row says so when it is not).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import report as R
from benchmarks.jobs import BenchError, ConversionJob, Job, dir_mb
from sdxs_edge import cpu
from sdxs_edge.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[1]
# Runtimes measured here and the bundle target each runs (torch runs the model itself).
# executorch-native runs the executorch bundles in the host runner (runtimes/native_session.py), which the
# run builds first when it is missing or older than its source (runtimes/native/build_host.sh), as it
# builds libsdxs for executorch-capi (runtimes/capi_session.py: the C API in this process).
RUNTIME_TARGETS = {
    "torch": None,
    "onnxruntime": "onnx",
    "executorch": "executorch",
    "executorch-native": "executorch",
    "executorch-capi": "executorch",
}
RUNTIME_PACKAGES = {
    "torch": ("torch",),
    "onnxruntime": ("onnx", "onnxruntime"),
    "executorch": ("executorch",),
    "executorch-native": ("executorch",),
    "executorch-capi": ("executorch",),
}
EXTRAS = {
    "onnxruntime": "onnx",
    "executorch": "executorch",
    "executorch-native": "executorch",
    "executorch-capi": "executorch",
    "torch": "all",
}
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_RUNTIMES = ("torch", "onnxruntime", "executorch", "executorch-native")
HOST_RUNNER_BUILD = ROOT / "runtimes" / "native" / "build_host.sh"
OPENVINO_PRECISIONS = ("fp32", "int8")
TORCH_EAGER = "torch eager fp32"
BENCH_EXTRA = "pip install '.[bench]'"
FORMAT = "sdxs-edge-bench"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BenchConfig:
    """A resolved benchmark request (written into the results JSON).

    Args:
        model: preset name, absolute model folder, or hub id the workers load.
        model_name: short name used in titles and the default output folder.
        runtimes: runtimes measured at every precision ("torch", "onnxruntime", "executorch",
            "executorch-native").
        precisions: precisions measured on every runtime.
        resolution: image side in pixels (every path and baseline at the same size).
        runs: measured repetitions per path (median and p90 over these).
        warmup: unmeasured repetitions before them (the first is reported as the cold run).
        threads: intra-op threads every backend is pinned to.
        out_dir: where results.json, results.md and chart.png go.
        work_dir: where bundles, OpenVINO IR, job files and worker logs go.
        baselines: also measure torch eager fp32 and the teacher architecture.
        openvino: also measure OpenVINO fp32 and NNCF int8 (when installed).
        teacher: the multi-step baseline architecture (preset or folder).
        teacher_steps: its step count for the guided total (25, as commonly run for SD-2.1).
        reuse_bundles: keep bundles already in `work_dir` that match (conversion time then comes from
            their manifest) instead of converting again.
        seed: weight seed of presets (the converters' default is 0).
        attention: attention layout of every sdxs-edge bundle ("standard" or "split-heads").
        rounds: times every measured path (not the teacher) runs, round-robin, each in a fresh process;
            its runs are pooled (see `merge_rounds`).
    """

    model: str
    model_name: str
    runtimes: tuple[str, ...]
    precisions: tuple[str, ...]
    resolution: int
    runs: int
    warmup: int
    threads: int
    out_dir: str
    work_dir: str
    baselines: bool
    openvino: bool
    teacher: str
    teacher_steps: int
    reuse_bundles: bool
    seed: int
    attention: str = "standard"
    rounds: int = 1


# ---- request -------------------------------------------------------------------------------------------
def _unet_config(model: str) -> dict | None:
    """The U-Net config of a preset or local folder, without loading any weights (None for a hub id)."""
    from sdxs_edge.presets import PRESETS

    if model in PRESETS:
        return dict(PRESETS[model].unet)
    cfg = Path(model) / "unet" / "config.json"
    if Path(model).is_dir():
        if not cfg.is_file():
            raise BenchError(f"{model} has no unet/config.json; not a diffusers model folder")
        return json.loads(cfg.read_text())
    return None


def _check_resolution(model: str, resolution: int) -> None:
    if resolution < 8 or resolution % 8:
        raise BenchError(f"resolution must be a positive multiple of 8, got {resolution}")
    unet = _unet_config(model)
    if unet is not None:
        stages = len(unet["block_out_channels"])
        step = 8 * 2 ** (stages - 1)
        if resolution % step:
            raise BenchError(
                f"resolution {resolution} must be a multiple of {step} for {model} ({stages} U-Net stages)"
            )


def _resolve_model(model: str) -> tuple[str, str]:
    from sdxs_edge.presets import PRESETS

    if model in PRESETS:
        return model, model
    p = Path(model).expanduser()
    if p.is_dir():
        return str(p.resolve()), p.resolve().name
    if p.exists():
        raise BenchError(f"{model} is a file; expected a preset or a diffusers model folder")
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return model, model.replace("/", "--")
    raise BenchError(f"no preset or model folder named {model!r}; valid presets: {', '.join(PRESETS)}")


def _split(v: str | Sequence[str]) -> tuple[str, ...]:
    items = v.split(",") if isinstance(v, str) else list(v)
    return tuple(dict.fromkeys(s.strip() for s in items if s.strip()))


@dataclass(frozen=True)
class BenchRequest:
    """A benchmark request as given (`run_bench`'s arguments); `resolve_config` checks it."""

    model: str
    runtimes: str | Sequence[str] = DEFAULT_RUNTIMES
    precisions: str | Sequence[str] = PRECISIONS
    resolution: int | None = None
    runs: int = 5
    warmup: int = 1
    threads: int | None = None
    out_dir: str | os.PathLike | None = None
    baselines: bool = True
    openvino: bool = True
    teacher: str = "sd21-base"
    teacher_steps: int = 25
    work_dir: str | os.PathLike | None = None
    reuse_bundles: bool = False
    seed: int = 0
    attention: str = "standard"
    rounds: int = 1


def _check_runtimes(rts: tuple[str, ...], precs: tuple[str, ...]) -> None:
    if not rts:
        raise BenchError(f"no runtimes given; choose from {', '.join(RUNTIME_TARGETS)}")
    for rt in rts:
        if rt == "openvino":
            raise BenchError(
                "openvino is a baseline, measured unless --no-openvino; list only "
                + ", ".join(RUNTIME_TARGETS)
                + " in --runtimes"
            )
        if rt not in RUNTIME_TARGETS:
            raise BenchError(
                f"runtime {rt!r} cannot be benchmarked on this host; choose from {', '.join(RUNTIME_TARGETS)}"
            )
        missing = [p for p in RUNTIME_PACKAGES[rt] if importlib.util.find_spec(p) is None]
        if missing:
            raise BenchError(f"runtime {rt} needs {', '.join(missing)} (pip install '.[{EXTRAS[rt]}]')")
    if not precs:
        raise BenchError(f"no precisions given; choose from {', '.join(PRECISIONS)}")
    bad = [p for p in precs if p not in PRECISIONS]
    if bad:
        raise BenchError(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}")


def _check_counts(req: BenchRequest) -> int:
    """Checks the repetition counts; returns the thread count (default: the usable cores)."""
    if req.runs < 1:
        raise BenchError(f"runs must be >= 1, got {req.runs}")
    if req.warmup < 0:
        raise BenchError(f"warmup must be >= 0, got {req.warmup}")
    if req.rounds < 1:
        raise BenchError(f"rounds must be >= 1, got {req.rounds}")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = req.threads if req.threads is not None else usable
    if threads < 1:
        raise BenchError(f"threads must be >= 1, got {threads}")
    if req.teacher_steps < 1:
        raise BenchError(f"teacher_steps must be >= 1, got {req.teacher_steps}")
    return threads


def _resolution(req: BenchRequest, src: str) -> int:
    resolution = req.resolution
    if resolution is None:
        unet = _unet_config(src)
        if unet is None:
            raise BenchError(
                f"{req.model} is a hub id: pass --resolution (the model's own is read only from a preset or local folder)"
            )
        resolution = int(unet["sample_size"]) * 8
    _check_resolution(src, resolution)
    return resolution


def resolve_config(req: BenchRequest) -> BenchConfig:
    """Check a request before any work starts; every problem is one BenchError naming the fix."""
    from sdxs_edge.attention import ATTENTION_VARIANTS

    if req.attention not in ATTENTION_VARIANTS:
        raise BenchError(f"attention must be one of {', '.join(ATTENTION_VARIANTS)}; got {req.attention!r}")
    src, name = _resolve_model(req.model)
    rts, precs = _split(req.runtimes), _split(req.precisions)
    _check_runtimes(rts, precs)
    threads = _check_counts(req)
    resolution = _resolution(req, src)
    teacher_src = req.teacher
    if req.baselines:
        teacher_src, _ = _resolve_model(req.teacher)
        _check_resolution(teacher_src, resolution)
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError(f"the chart needs matplotlib ({BENCH_EXTRA})")
    if not hasattr(os, "wait4"):
        raise BenchError("the per-process peak memory figure needs os.wait4 (Linux or macOS)")
    slug = f"{name}-{resolution}"
    results = f"{slug}-{cpu.host_class()}"  # figures hold for one CPU class: the folder names it
    out = Path(req.out_dir) if req.out_dir is not None else ROOT / "benchmarks" / "results" / results
    work = Path(req.work_dir) if req.work_dir is not None else ROOT / "out" / "bench" / slug
    return BenchConfig(
        model=src,
        model_name=name,
        runtimes=rts,
        precisions=precs,
        resolution=int(resolution),
        runs=int(req.runs),
        warmup=int(req.warmup),
        threads=int(threads),
        out_dir=str(out.resolve()),
        work_dir=str(work.resolve()),
        baselines=bool(req.baselines),
        openvino=bool(req.openvino),
        teacher=teacher_src,
        teacher_steps=int(req.teacher_steps),
        reuse_bundles=bool(req.reuse_bundles),
        seed=int(req.seed),
        attention=req.attention,
        rounds=int(req.rounds),
    )


# ---- workers -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerOutcome:
    """What a worker process left behind.

    Args:
        result: its result JSON (None if it wrote none).
        peak_rss_mb: its peak resident memory over its whole life: the high-water mark the worker reads
            itself at its end (`jobs.peak_rss_mb`, VmHWM on Linux); wait4's ru_maxrss when it wrote no
            result (that figure may carry the orchestrator's own peak over, see `jobs.peak_rss_mb`).
        wall_s: its wall-clock life, imports included.
        crash: one line when it exited non-zero or wrote no result (with the log path), else None.
    """

    result: dict | None
    peak_rss_mb: float
    wall_s: float
    crash: str | None


def spawn(job: Job, name: str, work: Path) -> WorkerOutcome:
    """Run one job in a fresh `python -m benchmarks.worker` process and reap it with wait4.

    Args:
        job: the job (its `result` path is where the worker writes).
        name: file stem for the job file and log under `work/jobs/`.
        work: the work folder.
    """
    jobs = work / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job_file, log = jobs / f"{name}.json", jobs / f"{name}.log"
    Path(job.result).unlink(missing_ok=True)
    write_atomic(job_file, job.to_json())
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # OpenMP-based kernels (PyTorch's) take their pool size from here before any call can set it.
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(job.threads)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    t = time.perf_counter()
    # Output goes to a file, not a pipe: the libraries log a lot and a full pipe would block the worker.
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", str(job_file)], stdout=fh, stderr=subprocess.STDOUT, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    rss = usage.ru_maxrss / (1 << 20) if platform.system() == "Darwin" else usage.ru_maxrss / 1024
    result = json.loads(Path(job.result).read_text()) if Path(job.result).is_file() else None
    if result is not None and result.get("peak_rss_mb") is not None:
        rss = float(result["peak_rss_mb"])
    crash = None
    if code != 0 or result is None:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        crash = f"worker exited {code}: {(lines or ['no output'])[-1][:300]} (log: {log})"
    return WorkerOutcome(result, round(rss, 1), round(wall, 2), crash)


def _job(cfg: BenchConfig, kind: str, name: str, **kw) -> Job:
    return Job(
        kind=kind,
        model=kw.pop("model", cfg.model),
        resolution=cfg.resolution,
        threads=cfg.threads,
        runs=cfg.runs,
        warmup=cfg.warmup,
        result=str(Path(cfg.work_dir) / "jobs" / f"{name}.result.json"),
        seed=cfg.seed,
        attention=cfg.attention,
        **kw,
    )


# ---- conversions ---------------------------------------------------------------------------------------
def _bundle_parity(manifest: dict) -> dict:
    par = manifest["parity"]
    comps = {
        n: ("structural" if p.get("checked") == "structural" else p.get("snr_db")) for n, p in par["components"].items()
    }
    return {
        "checked": par["checked"],
        "components": comps,
        "image_psnr_db": par["end_to_end"].get("image_psnr_db"),
        "null_db_means": "exact match",
    }


def _conversion_row(c: ConversionJob, wall: float | None, reused: bool, error: str | None) -> dict:
    row = {"target": c.target, "precision": c.precision, "bundle": c.out, "reused": reused, "wall_s": wall}
    if error:
        return {**row, "status": "error", "error": error}
    out = Path(c.out)
    if c.target == "openvino":
        from benchmarks.openvino_backend import META_FILE

        meta = json.loads((out / META_FILE).read_text())
        par = meta["parity"]
        tok = Path(c.source_bundle) / "tokenizer"
        return {
            **row,
            "status": "ok",
            "seconds": meta["conversion"]["seconds"],
            "stage_seconds": meta["conversion"]["stage_seconds"],
            "bundle_mb": round(dir_mb(out) + (dir_mb(tok) if tok.exists() else 0.0), 3),
            "components_mb": {n: round(dir_mb(out / f"{n}.xml") + dir_mb(out / f"{n}.bin"), 3) for n in R.COMPONENTS},
            "scheme": meta["scheme"],
            "parity": {
                "checked": par["checked"],
                "components": {n: p["snr_db"] for n, p in par["components"].items()},
                "image_psnr_db": par["end_to_end"]["image_psnr_db"],
                "null_db_means": "exact match",
            },
        }
    m = json.loads((out / "manifest.json").read_text())
    return {
        **row,
        "status": "ok",
        "seconds": m["conversion"]["seconds"],
        "stage_seconds": m["conversion"]["stage_seconds"],
        "bundle_mb": dir_mb(out),
        "components_mb": {n: dir_mb(out / d["file"]) for n, d in m["components"].items()},
        "scheme": m["conversion"]["registry"]["summary"],
        "parity": _bundle_parity(m),
    }


def _reusable(cfg: BenchConfig, c: ConversionJob) -> bool:
    out = Path(c.out)
    try:
        if c.target == "openvino":
            from benchmarks.openvino_backend import META_FILE

            m = json.loads((out / META_FILE).read_text())
            return (m["model"], m["resolution"], m["precision"]) == (cfg.model, cfg.resolution, c.precision) and all(
                (out / f"{n}.xml").is_file() for n in R.COMPONENTS
            )
        m = json.loads((out / "manifest.json").read_text())
        attention = m["conversion"]["config"].get("attention", "standard")
        return (m["source"]["model"], m["target"], m["precision"], m["resolution"], attention) == (
            cfg.model,
            c.target,
            c.precision,
            cfg.resolution,
            cfg.attention,
        )
    except (OSError, ValueError, KeyError):
        return False


def plan_conversions(cfg: BenchConfig, openvino_precisions: Sequence[str]) -> list[ConversionJob]:
    """Bundles the run needs: every (target, precision) of the requested runtimes, the ONNX fp32 bundle
    OpenVINO is built from, and the OpenVINO IR folders."""
    work = Path(cfg.work_dir) / "bundles"
    jobs = []
    for rt in cfg.runtimes:
        target = RUNTIME_TARGETS[rt]
        if target:
            jobs += [ConversionJob(target, p, str(work / f"{target}-{p}")) for p in cfg.precisions]
    if openvino_precisions:
        onnx32 = ConversionJob("onnx", "fp32", str(work / "onnx-fp32"))
        if onnx32 not in jobs:
            jobs.insert(0, onnx32)
        jobs += [
            ConversionJob("openvino", p, str(work / f"openvino-{p}"), source_bundle=onnx32.out)
            for p in openvino_precisions
        ]
    return list(dict.fromkeys(jobs))


def run_conversions(
    cfg: BenchConfig, jobs: list[ConversionJob], say: Callable[[str], None]
) -> dict[tuple[str, str], dict]:
    """Convert (or reuse) every bundle in one converter process; rows keyed by (target, precision)."""
    rows: dict[tuple[str, str], dict] = {}
    todo = []
    onnx32_reused = True
    for c in jobs:
        reuse = cfg.reuse_bundles and _reusable(cfg, c) and (c.target != "openvino" or onnx32_reused)
        if (c.target, c.precision) == ("onnx", "fp32"):
            onnx32_reused = reuse
        if reuse:
            rows[(c.target, c.precision)] = _conversion_row(c, None, True, None)
            say(f"reusing {c.target}/{c.precision} bundle {c.out}")
        else:
            todo.append(c)
    if not todo:
        return rows
    say("converting " + ", ".join(f"{c.target}/{c.precision}" for c in todo) + " (one process) ...")
    job = _job(cfg, "convert", "convert", conversions=tuple(todo))
    w = spawn(job, "convert", Path(cfg.work_dir))
    done = {(r["target"], r["precision"]): r for r in (w.result or {}).get("conversions", [])}
    for c in todo:
        r = done.get((c.target, c.precision))
        if r is None:
            why = (w.result or {}).get("error") or w.crash or "not reached"
            rows[(c.target, c.precision)] = _conversion_row(c, None, False, f"converter process: {why}")
        else:
            rows[(c.target, c.precision)] = _conversion_row(c, r["wall_s"], False, r.get("error"))
        row = rows[(c.target, c.precision)]
        say(
            f"  {c.target}/{c.precision}: "
            + (f"{row['seconds']:.1f} s, {row['bundle_mb']:.1f} MB" if row["status"] == "ok" else row["error"])
        )
    return {(c.target, c.precision): rows[(c.target, c.precision)] for c in jobs}  # in plan order


# ---- measurements --------------------------------------------------------------------------------------
def _path_row(
    name: str,
    runtime: str,
    precision: str,
    role: str,
    w: WorkerOutcome | None = None,
    status: str | None = None,
    reason: str | None = None,
) -> dict:
    row = {"name": name, "runtime": runtime, "precision": precision, "role": role}
    if w is None:
        return {**row, "status": status, "reason": reason}
    if w.crash:
        return {**row, "status": "error", "reason": w.crash, "peak_rss_mb": w.peak_rss_mb}
    if w.result.get("status") != "ok":
        return {**row, "status": "error", "reason": w.result.get("error"), "peak_rss_mb": w.peak_rss_mb}
    res = {k: v for k, v in w.result.items() if k not in ("status", "peak_rss_mb")}
    return {**row, "status": "ok", **res, "peak_rss_mb": w.peak_rss_mb, "process_wall_s": w.wall_s}


def measure_session(
    cfg: BenchConfig, runtime: str, precision: str, conv: dict | None, name: str, role: str, ir_conv: dict | None = None
) -> dict:
    """One bundle on one runtime in a fresh worker; conversion figures copied onto the row."""
    src = ir_conv or conv
    if conv is None or conv["status"] != "ok" or (ir_conv is not None and ir_conv["status"] != "ok"):
        bad = src if src and src.get("status") != "ok" else conv
        return _path_row(
            name,
            runtime,
            precision,
            role,
            status="error",
            reason=f"conversion failed: {bad['error'] if bad else 'no bundle'}",
        )
    stem = name.replace(" ", "-")
    job = _job(
        cfg,
        "session",
        stem,
        runtime=runtime,
        precision=precision,
        bundle=conv["bundle"],
        ir_dir=ir_conv["bundle"] if ir_conv else None,
    )
    row = _path_row(name, runtime, precision, role, spawn(job, stem, Path(cfg.work_dir)))
    row.update(
        bundle=src["bundle"],
        bundle_mb=src["bundle_mb"],
        conversion_s=src["seconds"],
        bundle_reused=src["reused"],
        parity=src["parity"],
        scheme=src["scheme"],
    )
    return row


def merge_rounds(rows: list[dict]) -> dict:
    """One row from a path's rounds (each a fresh process): the runs of every round pooled into the
    component, tokenize, other and end-to-end statistics (median, p90 and min over all of them, the
    per-round end-to-end medians kept beside), load and first-run times as the median round, peak
    memory as the largest. A round that failed makes the row that failure."""
    import numpy as np

    from benchmarks.jobs import stats_e2e, stats_ms

    if len(rows) == 1:
        return rows[0]
    bad = next((r for r in rows if r["status"] != "ok"), None)
    if bad is not None:
        return {**bad, "rounds": len(rows)}

    def pooled(get) -> dict | None:
        stats = [get(r) for r in rows]
        if any(s is None for s in stats):
            return None
        return stats_ms([x / 1000 for s in stats for x in s["samples_ms"]])

    out = dict(rows[0])
    out["rounds"] = len(rows)
    out["components"] = {c: pooled(lambda r, c=c: r["components"].get(c)) for c in rows[0]["components"]}
    for key in ("tokenize", "other"):
        if rows[0].get(key) is not None:
            out[key] = pooled(lambda r, key=key: r.get(key))
    e = stats_e2e([x for r in rows for x in r["end_to_end"]["samples_s"]], rows[0]["end_to_end"]["batch"])
    e["round_medians_s"] = [r["end_to_end"]["median_s"] for r in rows]
    out["end_to_end"] = e
    for key in ("load_s", "first_run_s"):
        if rows[0].get(key) is not None:
            out[key] = round(float(np.median([r[key] for r in rows])), 4)
    for key in ("peak_rss_mb", "rss_after_load_mb", "driver_peak_rss_mb"):
        if rows[0].get(key) is not None:
            out[key] = max(r[key] for r in rows)
    out["process_wall_s"] = round(sum(r.get("process_wall_s", 0.0) for r in rows), 2)
    if rows[0].get("runner"):
        run = dict(rows[0]["runner"])
        run["execute_ms"] = {c: pooled(lambda r, c=c: r["runner"]["execute_ms"].get(c)) for c in run["execute_ms"]}
        run["peak_rss_mb"] = max(r["runner"]["peak_rss_mb"] for r in rows)
        out["runner"] = run
    return out


def busy_warnings(machine: dict, threads: int) -> list[str]:
    """A warning when other work shared the CPU: spinning thread pools make timings jump by whole
    scheduler slices then, so medians are not the machine's figures."""
    out = []
    for when in ("start", "end"):
        la = machine.get(f"load_average_at_{when}")
        if la and la[0] > 0.5 * (machine.get("usable_cores") or threads):
            out.append(
                f"the machine was busy at the {when} (1-minute load average {la[0]} on {machine.get('usable_cores')} usable cores): timings include contention from other processes; rerun on an idle machine for reference figures"
            )
    return out


def build_host_runner(say: Callable[[str], None]) -> None:
    """Build (or find up to date) the host runner the executorch-native runtime starts; BenchError naming
    the build's own error when it cannot be built (no C++ compiler, say)."""
    say("checking the host runner (runtimes/native/build_host.sh) ...")
    env = {**os.environ, "PY": sys.executable}
    proc = subprocess.run(["bash", str(HOST_RUNNER_BUILD)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise BenchError(
            f"runtime executorch-native needs the host runner, and building it failed: {(lines or ['no output'])[-1][:300]}"
        )


def openvino_state(enabled: bool) -> dict:
    """Whether the OpenVINO baseline runs, and which precisions; the reason when it does not."""
    if not enabled:
        return {"status": "skipped", "reason": "--no-openvino", "precisions": []}
    if importlib.util.find_spec("openvino") is None:
        return {"status": "not installed", "reason": f"openvino: not installed ({BENCH_EXTRA})", "precisions": []}
    if importlib.util.find_spec("nncf") is None:
        return {
            "status": "partial",
            "reason": f"nncf: not installed, so no OpenVINO int8 ({BENCH_EXTRA})",
            "precisions": ["fp32"],
        }
    return {"status": "ok", "reason": None, "precisions": list(OPENVINO_PRECISIONS)}


def run_bench(
    model: str,
    runtimes: str | Sequence[str] = DEFAULT_RUNTIMES,
    precisions: str | Sequence[str] = PRECISIONS,
    resolution: int | None = None,
    runs: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    out_dir: str | os.PathLike | None = None,
    baselines: bool = True,
    openvino: bool = True,
    *,
    teacher: str = "sd21-base",
    teacher_steps: int = 25,
    work_dir: str | os.PathLike | None = None,
    reuse_bundles: bool = False,
    seed: int = 0,
    attention: str = "standard",
    rounds: int = 1,
    progress: bool = True,
) -> dict:
    """Benchmark a model's runtime x precision paths and baselines; write results.json, results.md, chart.png.

    Args:
        model: preset name, diffusers folder or hub id.
        runtimes: "torch", "onnxruntime", "executorch", "executorch-native", "executorch-capi" (list or
            comma-separated string).
        precisions: "fp32", "fp16", "int8" (list or comma-separated string). The torch runtime runs the
            model in float32 only on CPU; its other precisions get a "not applicable" row.
        resolution: image side in pixels (default: the model's).
        runs: measured repetitions per path.
        warmup: unmeasured repetitions first.
        threads: threads every backend is pinned to (default: the cores this process may use).
        out_dir: results folder (default benchmarks/results/<model>-<resolution>/).
        baselines: measure torch eager fp32 and the teacher architecture at 1 and `teacher_steps` steps.
        openvino: measure OpenVINO fp32 and NNCF int8 (a row reports it when not installed).
        teacher: the multi-step baseline architecture (default "sd21-base", random weights).
        teacher_steps: steps of the guided teacher total.
        work_dir: bundles, IR, job files and logs (default out/bench/<model>-<resolution>/).
        reuse_bundles: reuse matching bundles already in `work_dir` instead of converting again.
        seed: weight seed of presets.
        attention: attention layout of the sdxs-edge bundles: "standard" or "split-heads" (one head at a
            time; see `sdxs_edge.attention`). OpenVINO is built from the ONNX fp32 bundle, so it gets the
            same layout.
        rounds: measure every path (torch eager, each bundle, OpenVINO; not the teacher) this many times,
            round-robin, each time in a fresh process, and pool their runs: on a shared machine a burst
            of other work then lands on every path alike instead of on whichever ran during it.
        progress: print one line per step.

    Returns:
        the report (as written to results.json).
    """
    req = BenchRequest(
        model, runtimes, precisions, resolution, runs, warmup, threads, out_dir, baselines, openvino,
        teacher, teacher_steps, work_dir, reuse_bundles, seed, attention, rounds,
    )  # fmt: skip
    cfg = resolve_config(req)
    say = (lambda s: print(f"[bench] {s}", flush=True)) if progress else (lambda s: None)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    machine = R.machine_info()
    ov = openvino_state(cfg.openvino)
    if {"executorch-native", "executorch-capi"} & set(cfg.runtimes):
        build_host_runner(say)
    conv = run_conversions(cfg, plan_conversions(cfg, ov["precisions"]), say)
    torch_seen: dict = {}  # the first torch eager worker's result (it says whether CUDA is there)
    paths = measure_paths(cfg, plan_paths(cfg, conv, ov, torch_seen), say)
    gpu, gpu_status = measure_gpu(cfg, torch_seen.get("result"), say)
    teacher_block = measure_teacher(cfg, say) if cfg.baselines else None
    rep = build_report(cfg, machine, started, conv, paths, ov, teacher_block, gpu, gpu_status)
    write_atomic(rep["files"]["chart"], R.chart_png(rep))
    write_atomic(rep["files"]["markdown"], R.markdown(rep))
    write_atomic(rep["files"]["json"], json.dumps(rep, indent=2) + "\n")
    say(f"wrote {rep['files']['json']}, {Path(rep['files']['markdown']).name} and {Path(rep['files']['chart']).name}")
    return rep


# A measured path: (name, task that measures it once, or None with the fixed row to report instead).
PlannedPath = tuple[str, "Callable[[], dict] | None", "dict | None"]


def plan_paths(cfg: BenchConfig, conv: dict, ov: dict, torch_seen: dict) -> list[PlannedPath]:
    """Every path of the run as one task (or a fixed row where there is nothing to measure), in report order."""
    plan: list[PlannedPath] = []

    def torch_task(role: str) -> Callable[[], dict]:
        def run() -> dict:
            w = spawn(_job(cfg, "torch", "torch-eager-fp32"), "torch-eager-fp32", Path(cfg.work_dir))
            torch_seen["result"] = torch_seen.get("result") or w.result
            return _path_row(TORCH_EAGER, "torch", "fp32", role, w)

        return run

    for rt in cfg.runtimes:
        target = RUNTIME_TARGETS[rt]
        for p in cfg.precisions:
            if rt == "torch" and p != "fp32":
                why = "the torch runtime runs the source model in float32 on CPU (fp16 eager is measured on CUDA only)"
                plan.append(
                    (
                        f"torch {p}",
                        None,
                        _path_row(f"torch {p}", rt, p, "measured", status="not applicable", reason=why),
                    )
                )
            elif rt == "torch":
                plan.append((TORCH_EAGER, torch_task("measured"), None))
            else:
                name = f"{rt} {p}"
                plan.append(
                    (
                        name,
                        lambda rt=rt, p=p, name=name, target=target: measure_session(
                            cfg, rt, p, conv.get((target, p)), name, "measured"
                        ),
                        None,
                    )
                )
    if cfg.baselines and not any(name == TORCH_EAGER for name, _, _ in plan):
        plan.append((TORCH_EAGER, torch_task("baseline"), None))
    return plan + _openvino_paths(cfg, conv, ov)


def _openvino_paths(cfg: BenchConfig, conv: dict, ov: dict) -> list[PlannedPath]:
    if ov["status"] in ("skipped", "not installed"):
        return [
            (
                "openvino",
                None,
                _path_row("openvino", "openvino", "-", "baseline", status=ov["status"], reason=ov["reason"]),
            )
        ]
    plan: list[PlannedPath] = []
    for p in OPENVINO_PRECISIONS:
        name = f"openvino {p}"
        if p not in ov["precisions"]:
            plan.append(
                (name, None, _path_row(name, "openvino", p, "baseline", status="not installed", reason=ov["reason"]))
            )
        else:
            task = lambda p=p, name=name: measure_session(
                cfg, "openvino", p, conv.get(("onnx", "fp32")), name, "baseline", ir_conv=conv.get(("openvino", p))
            )  # noqa: E731
            plan.append((name, task, None))
    return plan


def measure_paths(cfg: BenchConfig, plan: list[PlannedPath], say: Callable[[str], None]) -> list[dict]:
    """Run every task `cfg.rounds` times, round-robin, and pool each path's rounds into one row."""
    measured: dict[str, list[dict]] = {name: [] for name, task, _ in plan if task}
    for r in range(cfg.rounds):
        for name, task, _ in plan:
            if task:
                say(f"measuring {name}" + (f" (round {r + 1} of {cfg.rounds})" if cfg.rounds > 1 else "") + " ...")
                measured[name].append(task())
    return [fixed if task is None else merge_rounds(measured[name]) for name, task, fixed in plan]


def measure_gpu(cfg: BenchConfig, torch_raw: dict | None, say: Callable[[str], None]) -> tuple[dict | None, str]:
    """Torch on CUDA when the torch worker saw a CUDA device; (figures, status line)."""
    if torch_raw is None or torch_raw.get("status") != "ok":
        return None, "torch runtime not measured"
    if not torch_raw.get("cuda_available"):
        return None, "no CUDA device: GPU figures not measured"  # as the torch worker saw it
    say("measuring torch on CUDA (fp16 eager, torch.compile reduce-overhead, batch search) ...")
    w = spawn(_job(cfg, "gpu", "torch-cuda"), "torch-cuda", Path(cfg.work_dir))
    if w.crash or w.result.get("status") != "ok":
        return None, f"error: {w.crash or w.result.get('error')}"
    return {k: v for k, v in w.result.items() if k not in ("status", "peak_rss_mb")}, "measured"


def measure_teacher(cfg: BenchConfig, say: Callable[[str], None]) -> dict:
    """The multi-step teacher baseline per component, with its guided-total projection."""
    say(f"measuring teacher baseline {cfg.teacher} per component ...")
    stem = "teacher-" + Path(cfg.teacher).name
    w = spawn(_job(cfg, "teacher", stem, model=cfg.teacher, teacher_steps=cfg.teacher_steps), stem, Path(cfg.work_dir))
    block = {"model": Path(cfg.teacher).name, "source": cfg.teacher, **_path_row(stem, "torch", "fp32", "baseline", w)}
    for k in ("name", "runtime", "precision", "role"):
        block.pop(k)
    if block["status"] == "ok":
        block["guidance"] = block.pop("default_guidance")
        block["projection"] = R.teacher_projection(block, cfg.teacher_steps)
        block["method"] = R.TEACHER_METHOD
    return block


def build_report(
    cfg: BenchConfig,
    machine: dict,
    started: float,
    conv: dict,
    paths: list[dict],
    ov: dict,
    teacher_block,
    gpu,
    gpu_status: str,
) -> dict:
    """results.json's content, from the config and every measurement."""
    torch_row = next((r for r in paths if r["name"] == TORCH_EAGER), None)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    out = Path(cfg.out_dir)
    rep = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": None,
        "config": asdict(cfg),
        "machine": machine,
        "model": {"name": cfg.model_name, "source": cfg.model, "resolution": cfg.resolution, "batch": 1},
        "conversions": list(conv.values()),
        "paths": paths,
        "baselines": {
            "torch_eager_fp32": TORCH_EAGER if torch_row else None,
            "one_step_same_method": R.same_method(torch_row) if torch_row else None,
            "teacher": teacher_block,
            "openvino": dict(ov),
        },
        "gpu": gpu,
        "gpu_status": gpu_status,
        "ratios": R.compute_ratios(paths, teacher_block, TORCH_EAGER),
        "where_the_time_goes": R.where_the_time_goes(paths, teacher_block, TORCH_EAGER),
        "files": {
            "json": str(out / "results.json"),
            "markdown": str(out / "results.md"),
            "chart": str(out / "chart.png"),
        },
    }
    rep["warnings"] = busy_warnings(machine, cfg.threads)
    failed = [r["name"] for r in paths if r["status"] == "error"]
    failed += [f"{c['target']}/{c['precision']} conversion" for c in conv.values() if c["status"] != "ok"]
    if teacher_block and teacher_block["status"] == "error":
        failed.append(f"teacher baseline {teacher_block['model']}")
    if gpu_status.startswith("error"):
        failed.append("torch on CUDA")
    rep["failed"] = failed
    rep["wall_s"] = round(time.time() - started, 1)
    return rep


if __name__ == "__main__":  # `python -m benchmarks.bench`: the bench command of the CLI (benchmarks.cli)
    from benchmarks.cli import main

    sys.exit(main())
