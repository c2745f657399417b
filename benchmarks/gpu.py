"""CUDA figures of the torch runtime: fp16 eager and torch.compile(mode="reduce-overhead") (CUDA graphs),
each at batch 1 and at the batch size that maximises images per second (powers of two until out of
memory or no gain).

Called by the torch worker only when `torch.cuda.is_available()`; the CPU path never imports it. The
device and dtype are arguments so the same code is exercised on CPU in fp32 (eager) by hand.
"""

from __future__ import annotations

import time

from benchmarks.jobs import PROMPT
from benchmarks.worker import time_loop

MAX_BATCH = 64  # seven shapes: stays under torch._dynamo's default recompile limit of 8 per function
MIN_GAIN = 1.05  # a doubled batch must raise images per second by 5% for the search to go on


def _measure(pipe, mods, batch: int, resolution: int, runs: int, warmup: int, device, dtype, compiled: bool) -> dict:
    import torch

    from sdxs_edge import sampler

    c = pipe.one_step_constants()
    h = resolution // 8
    ids = pipe.tokenize([PROMPT] * batch).to(device=device, dtype=torch.int32)
    z = torch.randn(batch, 4, h, h, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def call(_: int) -> dict[str, float]:
        if compiled:
            # Each iteration is a new CUDA-graph step: earlier outputs may be overwritten from here on.
            torch.compiler.cudagraph_mark_step_begin()
        times = {}
        sync()
        t = time.perf_counter()
        ctx = mods["text_encoder"](ids)
        sync()
        times["text_encoder"] = time.perf_counter() - t
        t = time.perf_counter()
        eps = mods["unet"](sampler.initial_latent(z, c), ctx)
        sync()
        times["unet"] = time.perf_counter() - t
        t = time.perf_counter()
        mods["decoder"](sampler.denoised(eps, z, c).to(dtype))
        sync()
        times["decoder"] = time.perf_counter() - t
        return times

    with torch.inference_mode():
        # torch.compile traces and captures graphs on the first calls of a new shape: two extra warm-ups.
        return time_loop(call, runs, warmup + (2 if compiled else 0), batch=batch)


def _search(measure, max_batch: int, label: str = "") -> dict:
    """Batch 1, then doubling while images per second grows by MIN_GAIN and memory lasts."""
    import torch

    b1 = measure(1)
    print(f"{label} batch 1: {b1['end_to_end']['images_per_s']:.2f} images/s", flush=True)
    tried = [{"batch": 1, "images_per_s": b1["end_to_end"]["images_per_s"]}]
    best = {"batch": 1, **b1["end_to_end"]}
    batch = 2
    while batch <= max_batch:
        try:
            r = measure(batch)
        except torch.OutOfMemoryError:
            tried.append({"batch": batch, "out_of_memory": True})
            torch.cuda.empty_cache()
            break
        ips = r["end_to_end"]["images_per_s"]
        print(f"{label} batch {batch}: {ips:.2f} images/s", flush=True)
        tried.append({"batch": batch, "images_per_s": ips})
        if ips < best["images_per_s"] * MIN_GAIN:
            break
        best = {"batch": batch, **r["end_to_end"]}
        batch *= 2
    return {"batch1": b1, "best_batch": best, "searched": tried}


def gpu_figures(
    pipe,
    resolution: int,
    runs: int,
    warmup: int,
    device: str = "cuda",
    dtype: str = "float16",
    compile: bool = True,
    max_batch: int = MAX_BATCH,
    on_partial=None,
) -> dict:
    """fp16 eager and compiled latency and throughput of the one-step chain on a GPU.

    Args:
        pipe: the loaded `SDXSPipeline` (its modules are copied to the device, the CPU ones are untouched).
        resolution: image side in pixels.
        runs: measured calls per batch size.
        warmup: unmeasured calls first.
        device: "cuda" (or "cpu" to exercise the code by hand).
        dtype: "float16" (or "float32").
        compile: also measure torch.compile(mode="reduce-overhead").
        max_batch: the largest batch the search tries.
        on_partial: called with the figures so far after each mode, so a run cut short (a time limit,
            a crash while compiling) keeps what it measured.
    """
    import copy

    import torch

    from sdxs_edge.components import wrappers

    dev, dt = torch.device(device), getattr(torch, dtype)
    mods = {k: copy.deepcopy(m).to(device=dev, dtype=dt) for k, m in wrappers(pipe).items()}
    out = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else device,
        "dtype": dtype,
        "note": "token ids and noise are made once per batch size; end to end = text encoder + U-Net + sampler rule + decoder, with a device sync after each component",
        "eager": _search(
            lambda b: _measure(pipe, mods, b, resolution, runs, warmup, dev, dt, False), max_batch, "eager"
        ),
    }
    if on_partial is not None:
        on_partial(out)
    if compile:
        cmods = {k: torch.compile(m, mode="reduce-overhead") for k, m in mods.items()}
        t = time.perf_counter()
        out["compiled_reduce_overhead"] = _search(
            lambda b: _measure(pipe, cmods, b, resolution, runs, warmup, dev, dt, True), max_batch, "compiled"
        )
        out["compiled_reduce_overhead"]["search_wall_s"] = round(
            time.perf_counter() - t, 1
        )  # compilation and graph capture included
    return out
