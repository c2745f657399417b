"""The one-step chain on a CUDA GPU as one CUDA graph: token ids in, uint8 pixels in host memory out.

    python -m benchmarks.gpu_graph sdxs-512 --resolution 512 --out benchmarks/results/sdxs-512-512-h200/graph

Per call: the token ids are copied from pinned host memory into the graph's input, fresh noise is drawn
on the device, and one graph replay runs the text encoder, the U-Net, the one-step sampler rule, the
decoder and the conversion to uint8 HWC, whose result is copied back to pinned host memory. Nothing is
synchronised between components; calls are queued back to back and timed with CUDA events, so the
figure is sustained images per second of the whole chain (`headline`).

Variants (all fp16, U-Net and decoder in channels-last, the U-Net's q/k/v projections fused into one
matrix multiply (diffusers' `fuse_qkv_projections`), attention through PyTorch's fused scaled-dot-product
kernels, as diffusers' processors and transformers' CLIP call them):
- `eager`: the modules as they are, captured in one graph (cuDNN autotuned);
- `inductor`: each module through `torch.compile` (Inductor, default mode, no CUDA graphs of its own,
  1x1 convolutions as matrix multiplies), the three compiled modules and the eager sampler arithmetic
  captured in one graph;
- `inductor-max-autotune`: the same with `mode="max-autotune-no-cudagraphs"` (Triton GEMM and
  convolution templates benchmarked at compile time), when the time budget leaves room for it.

Every variant's uint8 image is compared with fp32 eager PyTorch on the same inputs (PSNR); its
per-component breakdown replays one graph per component, with a synchronisation after each. The fastest
variant at batch 1 is then run at doubling batch sizes while images per second grow by 5%.

CUDA only: there is no CPU form of this measurement (`benchmarks.bench` measures the CPU paths).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

from benchmarks.jobs import PROMPT
from sdxs_edge.atomic import write_atomic

VARIANTS = {
    "eager": None,
    "inductor": "default",
    "inductor-max-autotune": "max-autotune-no-cudagraphs",
}
MIN_GAIN = 1.05  # a doubled batch must raise images per second by 5% for the search to go on
MAX_BATCH = 256
AUTOTUNE_MIN_S = 150  # seconds of the budget max-autotune's compilation needs to be tried


def fp16_modules(pipe, device, dtype):
    """The exportable modules (`sdxs_edge.components.wrappers`) on the device, the U-Net's attention
    projections fused, U-Net and decoder in channels-last."""
    import torch

    from sdxs_edge.components import wrappers

    mods = {k: copy.deepcopy(m).to(device=device, dtype=dtype).eval() for k, m in wrappers(pipe).items()}
    mods["unet"].unet.fuse_qkv_projections()  # one projection GEMM for q, k, v (k, v in cross-attention)
    for k in ("unet", "decoder"):
        mods[k] = mods[k].to(memory_format=torch.channels_last)
    return mods


def chain(mods, c, dtype):
    """(token ids (B, 77) int32, noise (B, 4, h, w)) -> uint8 images (B, H, W, 3): the whole one-step chain."""
    import torch

    from sdxs_edge import sampler

    def run(ids, z):
        ctx = mods["text_encoder"](ids)
        eps = mods["unet"](sampler.initial_latent(z, c).contiguous(memory_format=torch.channels_last), ctx)
        img = mods["decoder"](sampler.denoised(eps, z, c).to(dtype))
        return ((img.float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    return run


def capture(fn, *static):
    """A CUDA graph of `fn(*static)` (warmed up on a side stream first: compilation, cuDNN's algorithm
    search and the allocator's growth stay outside the graph) and its output tensor."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*static)
    torch.cuda.synchronize()
    return g, out


def timed(step, iters: int, rounds: int) -> list[float]:
    """Milliseconds per `step()` call, one figure per round of `iters` calls queued back to back."""
    import torch

    step()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            step()
        b.record()
        b.synchronize()
        per.append(a.elapsed_time(b) / iters)
    return per


def psnr(a, b) -> float:
    mse = (a.float() - b.float()).square().mean().item()
    return round(10 * math.log10(255**2 / mse), 2) if mse > 0 else None  # None: identical


class Run:
    """One model on one GPU: inputs, the fp32 reference and the measurements so far."""

    def __init__(self, pipe, resolution: int, device: str = "cuda"):
        import torch

        self.torch = torch
        self.pipe, self.res, self.dev, self.dt = pipe, resolution, torch.device(device), torch.float16
        self.c = pipe.one_step_constants()
        self.mods = fp16_modules(pipe, self.dev, self.dt)
        self.gen = torch.Generator(device=self.dev).manual_seed(0)

    def inputs(self, batch: int):
        torch = self.torch
        ids = self.pipe.tokenize([PROMPT] * batch).to(torch.int32)
        h = self.res // 8
        z = torch.randn(batch, 4, h, h, generator=torch.Generator().manual_seed(1)).to(self.dev, self.dt)
        return ids.pin_memory(), ids.to(self.dev), z

    def reference(self, batch: int = 1):
        """The fp32 eager image (uint8) for batch-1 inputs, on the device."""
        torch = self.torch
        from sdxs_edge.components import wrappers

        mods = {k: copy.deepcopy(m).to(self.dev).eval() for k, m in wrappers(self.pipe).items()}
        _, ids, z = self.inputs(batch)
        with torch.inference_mode():
            out = chain(mods, self.c, torch.float32)(ids, z.float())
        del mods
        torch.cuda.empty_cache()
        return out

    def modules(self, variant: str):
        torch = self.torch
        mode = VARIANTS[variant]
        if mode is None:
            return self.mods
        return {k: torch.compile(m, mode=mode) for k, m in self.mods.items()}

    def measure(self, mods, batch: int, iters: int, rounds: int) -> dict:
        """Whole-chain graph at `batch`: ms per call (median of rounds), images per second, and the
        graph's first call's wall time (compilation and capture)."""
        torch = self.torch
        ids_host, ids, z = self.inputs(batch)
        t = time.perf_counter()
        with torch.inference_mode():
            g, out = capture(chain(mods, self.c, self.dt), ids, z)
        build_s = time.perf_counter() - t
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)

        def step():
            ids.copy_(ids_host, non_blocking=True)
            z.normal_(generator=self.gen)
            g.replay()
            host.copy_(out, non_blocking=True)

        z0 = z.clone()
        per = timed(step, iters, rounds)
        ms = statistics.median(per)
        z.copy_(z0)  # the fixed inputs again, for the check against the fp32 reference
        ids.copy_(ids_host)
        g.replay()
        torch.cuda.synchronize()
        img = out.clone()
        res = {
            "batch": batch,
            "ms_per_call": round(ms, 4),
            "images_per_s": round(batch * 1000 / ms, 1),
            "rounds_ms": [round(x, 4) for x in per],
            "iters_per_round": iters,
            "build_s": round(build_s, 1),
        }
        return res, img

    def components(self, mods, iters: int, rounds: int) -> dict:
        """Batch 1, one graph per component, a synchronisation after each: median ms per component."""
        torch = self.torch
        from sdxs_edge import sampler

        _, ids, z = self.inputs(1)
        with torch.inference_mode():
            te = capture(lambda i: mods["text_encoder"](i), ids)
            x = sampler.initial_latent(z, self.c).contiguous(memory_format=torch.channels_last)
            un = capture(lambda a, b: mods["unet"](a, b), x, te[1])
            dec = capture(lambda e: mods["decoder"](sampler.denoised(e, z, self.c).to(self.dt)), un[1])
        out = {}
        for name, (g, _) in (("text_encoder", te), ("unet", un), ("decoder", dec)):

            def step(g=g):
                g.replay()
                torch.cuda.synchronize()

            out[name] = round(statistics.median(timed(step, iters, rounds)), 4)
        return out


def search(run: Run, mods, first: dict, iters: int, rounds: int, deadline: float, on_row) -> list[dict]:
    """Doubling batch sizes from 2 while images per second grow by MIN_GAIN, memory and time last."""
    torch = run.torch
    rows, best, batch = [first], first, 2
    while batch <= MAX_BATCH and time.perf_counter() < deadline:
        try:
            r, _ = run.measure(mods, batch, max(4, iters // batch), rounds)
        except torch.OutOfMemoryError:
            rows.append({"batch": batch, "out_of_memory": True})
            torch.cuda.empty_cache()
            break
        except Exception as e:  # e.g. a recompilation that fails: the rows so far stand
            rows.append({"batch": batch, "failed": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"})
            break
        rows.append(r)
        on_row(rows)
        print(f"  batch {batch}: {r['images_per_s']:,.1f} images/s", flush=True)
        if r["images_per_s"] < best["images_per_s"] * MIN_GAIN:
            break
        best, batch = r, batch * 2
    return rows


def run_all(model: str, resolution: int, out: Path, budget_s: float, iters: int, rounds: int) -> dict:
    import torch
    import torch._dynamo.config
    import torch._inductor.config

    from sdxs_edge.pipeline import SDXSPipeline

    t0 = time.perf_counter()
    deadline = t0 + budget_s
    torch.backends.cudnn.benchmark = True
    # Each variant and batch size is its own compiled graph: stay far from the recompile limit (past it
    # torch.compile would run the module eagerly without a word).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    torch._inductor.config.conv_1x1_as_mm = True  # 1x1 convolutions as matrix multiplies Inductor can fuse
    pipe = SDXSPipeline.load(model)
    run = Run(pipe, resolution)
    res = {
        "format": "sdxs-edge-gpu-graph",
        "model": model,
        "resolution": resolution,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "dtype": "float16",
        "prompt": PROMPT,
        "load_s": round(time.perf_counter() - t0, 1),
        "variants": {},
    }
    save = lambda: write_atomic(out.with_suffix(".json"), json.dumps(res, indent=2))  # noqa: E731
    ref = run.reference()
    compiled = {}

    def batch1(variant: str) -> None:
        print(f"{variant}: compiling and capturing at batch 1", flush=True)
        try:
            compiled[variant] = run.modules(variant)
            b1, img = run.measure(compiled[variant], 1, iters, rounds)
            v = {"status": "ok", "batch1": b1, "psnr_vs_fp32_eager_db": psnr(img, ref)}
            v["components_ms"] = run.components(compiled[variant], iters, rounds)
            print(f"  batch 1: {b1['images_per_s']:,.1f} images/s, PSNR {v['psnr_vs_fp32_eager_db']} dB", flush=True)
        except Exception as e:  # a variant that fails to compile or capture is reported, the others go on
            v = {"status": f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
            print(f"  {v['status']}", flush=True)
        res["variants"][variant] = v
        save()

    ok = lambda: {k: v for k, v in res["variants"].items() if v["status"] == "ok"}  # noqa: E731
    batch1("eager")
    batch1("inductor")
    if ok():
        best = max(ok(), key=lambda k: ok()[k]["batch1"]["images_per_s"])
        print(f"{best}: batch search", flush=True)

        def on_row(rows):
            res["variants"][best]["batches"] = rows
            save()

        on_row(search(run, compiled[best], res["variants"][best]["batch1"], iters, rounds, deadline, on_row))
    left = deadline - time.perf_counter()
    if left > AUTOTUNE_MIN_S:
        batch1("inductor-max-autotune")
    else:
        res["variants"]["inductor-max-autotune"] = {"status": f"skipped: {left:.0f} s of the budget left"}
    if ok():
        h = max(ok(), key=lambda k: ok()[k]["batch1"]["images_per_s"])
        res["headline"] = {"variant": h, **ok()[h]["batch1"]}
        rows = [(k, r) for k, v in ok().items() for r in v.get("batches", [v["batch1"]]) if "images_per_s" in r]
        k, top = max(rows, key=lambda kr: kr[1]["images_per_s"])
        res["best_batch"] = {"variant": k, **top}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    save()
    write_atomic(out.with_suffix(".md"), render(res))
    return res


def render(res: dict) -> str:
    lines = [
        f"# {res['model']} at {res['resolution']}x{res['resolution']}: the whole chain as one CUDA graph",
        "",
        f"{res['device']}, torch {res['torch']}, {res['dtype']}. One call = token ids copied in, fresh noise, one graph "
        "replay (text encoder, U-Net, sampler rule, decoder, uint8 conversion), pixels copied to pinned host memory; "
        "calls queued back to back, CUDA events, median of rounds.",
        "",
        "| variant | status | batch 1 ms | batch 1 img/s | text encoder / U-Net / decoder ms (own graphs, synced) | PSNR vs fp32 eager dB | first call s |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for name, v in res["variants"].items():
        if v["status"] != "ok":
            lines.append(f"| {name} | {v['status']} | | | | | |")
            continue
        b, c = v["batch1"], v["components_ms"]
        comp = " / ".join(f"{c[k]:.3f}" for k in ("text_encoder", "unet", "decoder"))
        lines.append(
            f"| {name} | ok | {b['ms_per_call']:.3f} | {b['images_per_s']:,.1f} | {comp} | {v['psnr_vs_fp32_eager_db'] or 'identical'} | {b['build_s']} |"
        )
    if "headline" in res:
        h, bb = res["headline"], res["best_batch"]
        rows = res["variants"][bb["variant"]].get("batches", [])
        tried = ", ".join(
            f"{r['batch']}: {format(r['images_per_s'], ',.0f') if 'images_per_s' in r else ('OOM' if r.get('out_of_memory') else 'failed')}"
            for r in rows
        )
        lines += [
            "",
            f"Headline, batch 1: **{h['images_per_s']:,.1f} images/s** ({h['ms_per_call']:.3f} ms per image, {h['variant']}).",
            f"Best batch: **{bb['images_per_s']:,.0f} images/s** at batch {bb['batch']} ({bb['variant']}; images/s per batch tried: {tried}).",
        ]
    lines += [
        "",
        f"Wall time of the whole measurement: {res.get('wall_s', '?')} s (model built with random weights).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="preset (random weights) or model folder")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--out", required=True, help="OUT.json and OUT.md")
    p.add_argument(
        "--budget-s", type=float, default=420, help="wall-clock budget; later variants and batches are skipped past it"
    )
    p.add_argument(
        "--iters", type=int, default=200, help="calls per timed round at batch 1 (divided by the batch above it)"
    )
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: benchmarks.gpu_graph needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    res = run_all(a.model, a.resolution, Path(a.out), a.budget_s, a.iters, a.rounds)
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
