"""One benchmark job in its own process: `python -m benchmarks.worker JOB.json`.

The orchestrator (`benchmarks.bench`) starts a fresh process per measured path so the peak resident
memory it reads back (this process's ru_maxrss, via wait4) belongs to that path alone: an ONNX Runtime
measurement never imports PyTorch, a torch measurement never loaded ONNX Runtime. Every backend is
pinned to `job.threads` before it loads and the thread count it reports is written back.

An SDXSError (a failed conversion, a missing backend) is written to the result as that path's error;
anything else is a bug and ends the process with its traceback (the orchestrator reports the crash).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from benchmarks.jobs import PRESET_ONNX_CALIBRATION, PRESET_SENSITIVITY, PROMPT, Job, peak_rss_mb, stats_e2e, stats_ms
from sdxs_edge.atomic import write_atomic
from sdxs_edge.errors import SDXSError

COMPONENTS = ("text_encoder", "unet", "decoder")


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    import logging

    for name in ("torchao", "nncf", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)


def time_loop(call: Callable[[int], dict[str, float]], runs: int, warmup: int, batch: int = 1) -> dict:
    """Run `call(i)` `warmup` times unmeasured, then `runs` times measured.

    Args:
        call: one generation; returns seconds per component; its wall time is the end-to-end time.
        runs: measured calls.
        warmup: unmeasured calls first (the first call's wall time is reported as `first_run_s`).
        batch: images per call, for images per second.
    """
    first = None
    for i in range(warmup):
        t = time.perf_counter()
        call(i)
        first = time.perf_counter() - t if first is None else first
    e2e, comps, other = [], {}, []
    for i in range(runs):
        t = time.perf_counter()
        times = call(warmup + i)
        e2e.append(time.perf_counter() - t)
        for k, v in times.items():
            comps.setdefault(k, []).append(v)
        # Per run, so its median is a real run's overhead, not a difference of unrelated medians.
        other.append(max(e2e[-1] - sum(times.get(c, 0.0) for c in COMPONENTS), 0.0))
    return {
        "first_run_s": round(first if first is not None else e2e[0], 6),
        "components": {k: stats_ms(v) for k, v in comps.items() if k in COMPONENTS},
        "tokenize": stats_ms(comps["tokenize"]) if "tokenize" in comps else None,
        "other": stats_ms(other),
        "end_to_end": stats_e2e(e2e, batch),
    }


# ---- conversions ----------------------------------------------------------------------------------
def run_convert(job: Job) -> dict:
    """Every bundle of `job.conversions`, in order, in this one process; the result is rewritten after
    each so a crash keeps what finished. Heavy imports happen first and are timed apart, so the first
    conversion's time is not inflated by them."""
    t = time.perf_counter()
    import diffusers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from converters.api import backend
    from sdxs_edge.pipeline import SDXSPipeline  # noqa: F401

    for c in job.conversions:
        if c.target != "openvino":
            backend(c.target)
    result: dict = {"import_s": round(time.perf_counter() - t, 3), "conversions": []}
    failed: set[str] = set()
    for c in job.conversions:
        row = {"target": c.target, "precision": c.precision, "out": c.out}
        t = time.perf_counter()
        try:
            if c.source_bundle is not None and c.source_bundle in failed:
                # An older bundle may still sit there (a failed conversion leaves the old one untouched).
                raise SDXSError(f"its source bundle {c.source_bundle} failed to convert in this run")
            if c.target == "openvino":
                from benchmarks import openvino_backend

                openvino_backend.convert(c.source_bundle, c.precision, c.out, job.model, job.resolution, seed=job.seed)
            else:
                from converters import convert
                from sdxs_edge.presets import PRESETS

                short = (
                    {**PRESET_SENSITIVITY, "onnx_calibration": PRESET_ONNX_CALIBRATION} if job.model in PRESETS else {}
                )
                convert(
                    job.model,
                    c.target,
                    c.precision,
                    c.out,
                    resolution=job.resolution,
                    overwrite=True,
                    progress=False,
                    seed=job.seed,
                    attention=job.attention,
                    **short,
                )
        except SDXSError as e:
            row["error"] = f"{type(e).__name__}: {e}"
            failed.add(c.out)
        row["wall_s"] = round(time.perf_counter() - t, 3)
        result["conversions"].append(row)
        write_atomic(job.result, json.dumps(result, indent=2))
    return result


# ---- runtimes over bundles ------------------------------------------------------------------------
def run_session(job: Job) -> dict:
    """A bundle on onnxruntime, executorch or openvino: load time, then `generate_arrays` timed."""
    threads: dict = {}
    if job.runtime == "executorch":
        # The XNNPACK delegate runs on ExecuTorch's global pthreadpool; size it before any program loads.
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(job.threads)
    t = time.perf_counter()
    if job.runtime == "openvino":
        from benchmarks.openvino_backend import OpenVINOSession

        session = OpenVINOSession(job.bundle, ir_dir=job.ir_dir, threads=job.threads, verify=False)
        threads["INFERENCE_NUM_THREADS"] = session.threads
    elif job.runtime == "onnxruntime":
        import runtimes

        session = runtimes.load(job.bundle, "onnxruntime", threads=job.threads, verify=False)
        threads["intra_op_num_threads"] = session.sessions["unet"].get_session_options().intra_op_num_threads
    elif job.runtime == "executorch":
        import runtimes

        session = runtimes.load(job.bundle, "executorch", verify=False)
        threads["threadpool_threads"] = portable_lib._threadpool_get_thread_count()
    elif job.runtime == "executorch-native":
        import runtimes

        session = runtimes.load(job.bundle, "executorch-native", threads=job.threads, verify=False)
        threads["threadpool_threads"] = session.threads
    elif job.runtime == "executorch-capi":
        import runtimes

        session = runtimes.load(job.bundle, "executorch-capi", threads=job.threads, verify=False)
        threads["threadpool_threads"] = session.threads
    else:
        raise SDXSError(f"worker: no session runtime {job.runtime!r}")
    load_s = time.perf_counter() - t
    rss_load = peak_rss_mb()
    # executorch-native runs the programs in its runner process: the runner's own Method::execute times
    # are kept beside ours, and the path's memory is this (numpy-only) driver's peak plus the runner's.
    runner_ms: dict[str, list[float]] = {}

    def call(i: int) -> dict[str, float]:
        times = session.generate_arrays(PROMPT, seed=i).timings
        for c, t in getattr(session, "runner_timings", {}).items():
            runner_ms.setdefault(c, []).append(t["run_ms"][0] / 1000)
        return times

    with session:
        out = time_loop(call, job.runs, job.warmup, batch=session.batch)
    result = {"load_s": round(load_s, 4), "rss_after_load_mb": rss_load, "threads": threads, **out}
    if job.runtime == "executorch-native":
        if "torch" in sys.modules:
            raise SDXSError(
                "worker: the executorch-native driver imported torch; its memory figure would not be the app's"
            )
        result["runner"] = {
            "load_ms": session.load_ms,
            "workspace_sharing": session.workspace_sharing,
            "peak_rss_mb": session.peak_rss_mb(),
            "execute_ms": {c: stats_ms(v[job.warmup :]) for c, v in runner_ms.items()},
        }
    return result


# ---- PyTorch eager ---------------------------------------------------------------------------------
def _torch_setup(job: Job):
    import torch

    torch.set_num_threads(job.threads)
    return torch


def _load_wrapped(job: Job):
    """(pipeline, exportable wrappers, load seconds, peak RSS MB after loading) of the job's model."""
    from sdxs_edge.components import wrappers
    from sdxs_edge.pipeline import SDXSPipeline

    t = time.perf_counter()
    pipe = SDXSPipeline.load(job.model, seed=job.seed)
    mods = wrappers(pipe)
    return pipe, mods, time.perf_counter() - t, peak_rss_mb()


def run_torch(job: Job) -> dict:
    """Eager PyTorch fp32 on CPU: the `sdxs_edge.components` wrappers (the modules the torch runtime and
    every converter use) through the same tokenize -> encode -> one step -> decode chain as a Session."""
    import numpy as np

    torch = _torch_setup(job)
    from sdxs_edge import sampler
    from sdxs_edge.presets import PRESETS

    pipe, mods, load_s, rss_load = _load_wrapped(job)
    c = pipe.one_step_constants()
    h = job.resolution // 8

    def call(i: int) -> dict[str, float]:
        times = {}
        t = time.perf_counter()
        ids = pipe.tokenize([PROMPT]).to(torch.int32)
        times["tokenize"] = time.perf_counter() - t
        z = np.random.default_rng(i).standard_normal((1, 4, h, h), dtype=np.float32)
        with torch.inference_mode():
            t = time.perf_counter()
            ctx = mods["text_encoder"](ids)
            times["text_encoder"] = time.perf_counter() - t
            x_in = torch.from_numpy(sampler.initial_latent(z, c))
            t = time.perf_counter()
            eps = mods["unet"](x_in, ctx)
            times["unet"] = time.perf_counter() - t
            x0 = sampler.denoised(eps, torch.from_numpy(z), c).float()
            t = time.perf_counter()
            img = mods["decoder"](x0)
            times["decoder"] = time.perf_counter() - t
        img.numpy()
        return times

    out = time_loop(call, job.runs, job.warmup)
    result = {
        "load_s": round(load_s, 4),
        "load_note": "random weights built in memory (preset)"
        if job.model in PRESETS
        else "weights read from the model folder",
        "rss_after_load_mb": rss_load,
        "weights_mb": round(
            sum(
                p.numel() * p.element_size()
                for m in (pipe.c.text_encoder, pipe.c.unet, pipe.c.vae.decoder)
                for p in m.parameters()
            )
            / 1e6,
            3,
        ),
        "threads": {"torch_num_threads": torch.get_num_threads()},
        "cuda_available": torch.cuda.is_available(),
        **out,
    }
    return result


def run_gpu(job: Job) -> dict:
    """CUDA fp16 eager and torch.compile figures (`benchmarks.gpu`), in their own process so the CPU
    torch path's peak memory holds no CUDA context."""
    torch = _torch_setup(job)
    if not torch.cuda.is_available():
        raise SDXSError("the gpu job needs CUDA (torch.cuda.is_available() is False)")
    from benchmarks.gpu import gpu_figures
    from sdxs_edge.pipeline import SDXSPipeline

    partial = Path(job.result + ".partial")  # the eager figures, kept if compiling is cut short
    return gpu_figures(
        SDXSPipeline.load(job.model, seed=job.seed),
        job.resolution,
        job.runs,
        job.warmup,
        on_partial=lambda d: write_atomic(partial, json.dumps(d, indent=2)),
    )


def run_teacher(job: Job) -> dict:
    """The baseline architecture (e.g. sd21-base, random weights) in eager PyTorch fp32, per component:
    text encoder at batch 1, U-Net per evaluation at batch 1 (no guidance) and batch 2 (classifier-free
    guidance: conditional and unconditional halves in one call, as diffusers runs it), decoder at batch 1.
    Totals for 1 and `job.teacher_steps` steps are projected by the orchestrator from these."""
    torch = _torch_setup(job)

    pipe, mods, load_s, rss_load = _load_wrapped(job)
    h = job.resolution // 8
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenize([PROMPT]).to(torch.int32)
    d = pipe.c.text_encoder.config.hidden_size
    ctx1 = torch.randn(1, ids.shape[1], d, generator=g)
    ctx2 = torch.cat([ctx1, torch.randn(1, ids.shape[1], d, generator=g)])
    x1 = torch.randn(1, 4, h, h, generator=g)
    x2 = torch.cat([x1, x1])
    calls = {
        "text_encoder": lambda: mods["text_encoder"](ids),
        "unet_batch1": lambda: mods["unet"](x1, ctx1),
        "unet_batch2_cfg": lambda: mods["unet"](x2, ctx2),
        "decoder": lambda: mods["decoder"](x1),
    }
    comps = {}
    with torch.inference_mode():
        for name, fn in calls.items():
            for _ in range(job.warmup):
                fn()
            times = []
            for _ in range(job.runs):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            comps[name] = stats_ms(times)
    return {
        "load_s": round(load_s, 4),
        "rss_after_load_mb": rss_load,
        "threads": {"torch_num_threads": torch.get_num_threads()},
        "components": comps,
        "default_guidance": pipe.default_guidance,
        "unet_class": type(pipe.c.unet).__name__,
        "vae_class": type(pipe.c.vae).__name__,
        "parameters": {
            k: sum(p.numel() for p in m.parameters())
            for k, m in (("text_encoder", pipe.c.text_encoder), ("unet", pipe.c.unet), ("decoder", pipe.c.vae.decoder))
        },
    }


KINDS: dict[str, Callable[[Job], dict]] = {
    "convert": run_convert,
    "session": run_session,
    "torch": run_torch,
    "teacher": run_teacher,
    "gpu": run_gpu,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.worker JOB.json", file=sys.stderr)
        return 2
    _quiet()
    job = Job.from_json(Path(argv[0]).read_text())
    if job.kind not in KINDS:
        print(f"unknown job kind {job.kind!r}", file=sys.stderr)
        return 2
    try:
        result = {"status": "ok", **KINDS[job.kind](job)}
    except SDXSError as e:
        result = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    # A path that runs its models in a runner process (executorch-native) reports the runner's peak too:
    # the path's memory is both processes together.
    own = peak_rss_mb()
    if "runner" in result:
        result["driver_peak_rss_mb"] = own
        result["peak_rss_mb"] = round(own + result["runner"]["peak_rss_mb"], 1)
    else:
        result["peak_rss_mb"] = own
    write_atomic(job.result, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
