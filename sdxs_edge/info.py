"""`sdxs-edge info`: parameters, FLOPs and size per component of a model or preset."""

from __future__ import annotations

from pathlib import Path


def _flops(module, inputs) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(*inputs)
    return int(fc.get_total_flops())


def model_info(source: str, flops: bool = True) -> dict:
    """Per component: parameters, fp32 / fp16 size in MB, FLOPs of one forward at batch 1, on-disk size.

    Args:
        source: preset name, diffusers folder or hub id.
        flops: run one forward per component under torch's FLOP counter (seconds for sdxs-512).
    """
    from sdxs_edge.components import example_inputs, wrappers
    from sdxs_edge.models import count_parameters
    from sdxs_edge.pipeline import SDXSPipeline

    pipe = SDXSPipeline.load(source)
    mods = wrappers(pipe)
    rep = {"model": pipe.name, "resolution": pipe.resolution, "default_steps": pipe.default_steps, "components": {}}
    folder = Path(source)
    for name, mod in mods.items():
        sub = {"text_encoder": pipe.c.text_encoder, "unet": pipe.c.unet, "decoder": pipe.c.vae.decoder}[name]
        n = count_parameters(sub)
        item = {
            "class": type(sub).__name__ if name != "decoder" else f"{type(pipe.c.vae).__name__}.decoder",
            "parameters": n,
            "fp32_mb": n * 4 / 1e6,
            "fp16_mb": n * 2 / 1e6,
        }
        if flops:
            item["gflops"] = _flops(mod, example_inputs(pipe, name)) / 1e9
        folder_name = {"decoder": "vae"}.get(name, name)
        if folder.is_dir() and (folder / folder_name).is_dir():
            item["disk_mb"] = sum(f.stat().st_size for f in (folder / folder_name).glob("*.safetensors")) / 1e6
        rep["components"][name] = item
    return rep


def format_info(rep: dict) -> str:
    has_flops = all("gflops" in c for c in rep["components"].values())
    head = f"{'component':<14}{'class':<26}{'parameters':>14}{'fp32 MB':>10}{'fp16 MB':>10}" + (
        f"{'GFLOPs':>10}" if has_flops else ""
    )
    lines = [f"{rep['model']}  ({rep['resolution']}x{rep['resolution']}, {rep['default_steps']} step default)", head]
    for name, c in rep["components"].items():
        row = f"{name:<14}{c['class']:<26}{c['parameters']:>14,}{c['fp32_mb']:>10.1f}{c['fp16_mb']:>10.1f}"
        if has_flops:
            row += f"{c['gflops']:>10.2f}"
        lines.append(row)
    total = sum(c["parameters"] for c in rep["components"].values())
    lines.append(f"{'total':<40}{total:>14,}")
    return "\n".join(lines)
