"""One stage (U-Net KD) of the chain on tiny models, run in one process or under `torchrun` (DDP / FSDP):
`python tests/dist_stage.py OUT MODE [MODE ...]` with MODE one, ddp or fsdp. Each mode trains 2 steps,
then a second call with a fresh student resumes from that checkpoint up to 4 steps (as after a kill)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def setup():
    from sdxs_edge.models import build_text_encoder, build_unet
    from sdxs_edge.presets import get_preset
    from training.unet_kd import build_student

    torch.manual_seed(0)
    p = get_preset("tiny-teacher")
    teacher, text_encoder = build_unet(p), build_text_encoder(p)
    student, _ = build_student(teacher)
    g = torch.Generator().manual_seed(1)
    cache = {
        "mean": torch.randn(16, 4, 8, 8, generator=g),
        "std": torch.full((16, 4, 8, 8), 0.1),
        "ids": torch.randint(0, 49408, (16, 77), generator=g),
        "scaling_factor": torch.tensor(1.0),
    }
    return teacher, text_encoder, student, cache


def run(out: Path, mode: str, steps: int):
    from diffusers import DDPMScheduler

    from training import dist
    from training.unet_kd import UNetKDConfig, distill_unet

    teacher, text_encoder, student, cache = setup()
    par = dist.Parallel(fsdp=mode == "fsdp", grad_accum=1 if mode == "one" else 2, checkpointing=mode == "fsdp")
    cfg = UNetKDConfig(steps=steps, batch=4, lr=0.3, parallel=par)
    empty = torch.zeros(77, dtype=torch.long)
    return distill_unet(cfg, out, teacher, text_encoder, student, cache, empty, DDPMScheduler().alphas_cumprod)


def main(out: Path, modes: list[str]) -> None:
    from safetensors.torch import load_file

    from training import dist

    d = dist.init()
    result = {}
    for mode in modes:
        run(out / mode, mode, 2)
        model = run(out / mode, mode, 4)  # resumes from step 2
        saved = load_file(str(out / mode / "checkpoints" / "step-0000004" / "unet.safetensors")) if d.is_main else {}
        result[mode] = {
            "sharded": dist.is_sharded(model),
            "checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "matches_checkpoint": all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
            if d.is_main
            else None,
        }
    if d.is_main:
        (out / f"result-{'-'.join(modes)}.json").write_text(json.dumps(result))
    d.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
