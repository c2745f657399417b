"""Tiny encoder distillation, for one-step image-to-image (the recipe of `training.decoder`, run backwards).

The student is the encoder of the model's `AutoencoderTiny` (TAESD's plain CNN: strided convolutions and
residual blocks, no attention, no normalisation). It learns to reproduce the teacher VAE's encoder, in
the U-Net's latent space (the KL posterior mean times the teacher's scaling_factor, the latent
diffusers' img2img pipelines start from), on real images, with the loop, schedule and checkpoints of
`training.decoder`. The loss is TAESD's for its encoder, a direct latent match:

    L_E = || E_teacher(x) - E_student(x) ||_1

No adversarial or image term: the encoder's output is a latent, and the teacher's latents are computed
once for the whole image pool, so a step costs one student forward and backward (a few minutes at
64 x 64 on two CPU cores). `encoder_report` measures the round trip through the tiny decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training.loop import LoopConfig, Progress, cosine_lr, run_loop, set_lr


@dataclass(frozen=True)
class EncoderConfig:
    """Args:
    steps: optimizer steps.
    batch: images per step.
    lr: Adam learning rate.
    max_seconds: wall-clock budget (the loop checkpoints and stops when it is spent); None = none.
    """

    steps: int = 400
    batch: int = 32
    lr: float = 2e-3
    max_seconds: float | None = None


def teacher_encode(vae_kl, images: torch.Tensor) -> torch.Tensor:
    """Teacher encoder: images in [-1, 1] -> U-Net-space latents (posterior mean x scaling_factor)."""
    return vae_kl.encode(images).latent_dist.mean * vae_kl.config.scaling_factor


def distill_encoder(cfg: EncoderConfig, out: Path, vae_kl, student, image_pool: torch.Tensor, seed: int = 0):
    """Train `student.encoder` (an AutoencoderTiny) to match `vae_kl`'s encoder on `image_pool` (N, 3, H, W) in [-1, 1].

    Args:
        cfg: recipe settings.
        out: run folder (resumable).
        vae_kl: the teacher AutoencoderKL (frozen).
        student: the AutoencoderTiny whose encoder is trained (its decoder stays frozen).
        image_pool: training images in [-1, 1].
        seed: batch sampling seed.
    """
    vae_kl.requires_grad_(False).eval()
    student.decoder.requires_grad_(False).eval()
    student.encoder.train()
    with torch.no_grad():
        targets = torch.cat([teacher_encode(vae_kl, x) for x in image_pool.split(64)])
    opt = torch.optim.Adam(student.encoder.parameters(), cfg.lr, betas=(0.9, 0.99))
    progress = Progress(cfg.steps, cfg.max_seconds)

    def step(k: int) -> dict:
        set_lr(opt, cosine_lr(cfg.lr, k, progress(k)))
        g = torch.Generator().manual_seed(seed * 7919 + k)
        idx = torch.randint(0, len(image_pool), (cfg.batch,), generator=g)
        loss = F.l1_loss(student.encode(image_pool[idx]).latents, targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"latent_l1": loss.item()}

    run_loop(
        "encoder",
        out,
        LoopConfig(cfg.steps, ckpt_every=200, max_seconds=cfg.max_seconds),
        step,
        {"encoder": student.encoder},
        {"opt": opt},
    )
    student.encoder.eval()
    return student


@torch.no_grad()
def encoder_report(vae_kl, student, images: torch.Tensor) -> dict:
    """The student encoder against the teacher's on held-out images in [-1, 1]: latent SNR, the PSNR of
    the round trip through the tiny decoder for each encoder, and parameter counts."""
    from sdxs_edge.metrics import snr_db
    from sdxs_edge.models import count_parameters

    t_lat, s_lat = teacher_encode(vae_kl, images), student.encode(images).latents

    def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        mse = (((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).mean().item()
        return float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))

    via_teacher = student.decode(t_lat).sample
    via_student = student.decode(s_lat).sample
    return {
        "latent_snr_db_vs_teacher": float(snr_db(t_lat.numpy(), s_lat.numpy())),
        "round_trip_psnr_db_student": psnr(via_student, images),
        "round_trip_psnr_db_teacher": psnr(via_teacher, images),
        "psnr_db_vs_teacher_round_trip": psnr(via_student, via_teacher),
        "teacher_params": count_parameters(vae_kl.encoder) + count_parameters(vae_kl.quant_conv),
        "student_params": count_parameters(student.encoder),
    }


def main(argv: list[str] | None = None) -> int:
    """Distil the embedded model's tiny encoder from the SHAPES-64 teacher VAE and write it into the model.

    python -m training.encoder [--teacher models/shapes-teacher] [--model sdxs_edge/default_model]
    """
    import argparse
    import json

    import numpy as np
    from diffusers import AutoencoderKL, AutoencoderTiny
    from safetensors.torch import load_file, save_file

    from sdxs_edge import shapes

    p = argparse.ArgumentParser(prog="python -m training.encoder", description=main.__doc__)
    p.add_argument(
        "--teacher", default="models/shapes-teacher", help="diffusers folder whose vae/ is the teacher AutoencoderKL"
    )
    p.add_argument(
        "--model",
        default="sdxs_edge/default_model",
        help="diffusers folder whose vae/ (AutoencoderTiny) gets the encoder",
    )
    p.add_argument("--out", default="runs/encoder", help="run folder (checkpoints, log)")
    p.add_argument("--steps", type=int, default=EncoderConfig.steps)
    p.add_argument("--pool", type=int, default=1024, help="training images (SHAPES-64 renders)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--report", default="models/reports/encoder.json", help="where the report is written")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    teacher = AutoencoderKL.from_pretrained(Path(args.teacher) / "vae", torch_dtype=torch.float32)
    vae_dir = Path(args.model) / "vae"
    student = AutoencoderTiny.from_pretrained(vae_dir, torch_dtype=torch.float32)
    batch = next(shapes.train_stream(args.pool, seed=7, style="mixed"))
    pool = torch.from_numpy(shapes.to_tensor_range(batch.images))
    held = torch.from_numpy(shapes.to_tensor_range(np.stack([shapes.render(s) for s in shapes.eval_scenes(128, 0)])))
    import time

    t0 = time.time()
    cfg = EncoderConfig(steps=args.steps)
    distill_encoder(cfg, Path(args.out), teacher, student, pool)
    report = {
        "config": {**cfg.__dict__, "pool": args.pool, "threads": args.threads},
        "wall_clock_s": round(time.time() - t0),
        **encoder_report(teacher, student, held),
    }
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    dtype = next(iter(state.values())).dtype  # the shipped model stores half precision
    state.update({f"encoder.{k}": v.to(dtype).contiguous() for k, v in student.encoder.state_dict().items()})
    save_file(state, weights, metadata=metadata)
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
