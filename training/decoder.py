"""Tiny decoder distillation (arXiv 2403.16627 Sec. 3.1, Fig. 2a).

The student is an `AutoencoderTiny` decoder (plain CNN: residual blocks and upsampling, no attention,
no normalisation). It learns to reproduce the teacher VAE's decoder from latents of real images and of
the teacher's multi-step samples. Loss, as the paper writes it:

    L_G = || D8(G_teacher(z)) - D8(G_student(z)) ||_1  +  lambda_GAN * L_GAN(G_student(z))

with D8 an 8x average-pool: the pixel term only pins colours and layout, the adversarial term (a small
patch discriminator, hinge loss) supplies the detail. lambda_GAN is balanced adaptively as in VQGAN
(ratio of the two losses' gradient norms at the decoder's last layer), the balancing SDXS inherits from
its TAESD-style training. `full_l1` optionally adds a full-resolution L1 term; at SHAPES-64 scale on a
CPU budget it speeds convergence (set 0 for the paper's loss).

Both decoders take latents in the U-Net's space (scaled by the KL VAE's scaling_factor): the student is
an `AutoencoderTiny` with scaling_factor 1.0, exactly as TAESD replaces SD's VAE in SDXS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training import dist
from training.loop import LoopConfig, Progress, cosine_lr, run_loop, set_lr


@dataclass(frozen=True)
class DecoderConfig:
    """Args:
    steps: optimizer steps.
    batch: latents per step.
    lr: Adam learning rate of student and discriminator.
    gan_weight: upper bound of the adaptive GAN weight (0 disables the GAN).
    gan_start: step at which the adversarial term switches on (the pixel term settles first).
    full_l1: weight of an extra full-resolution L1 term (0 = the paper's loss).
    max_seconds: wall-clock budget (the loop checkpoints and stops when it is spent); None = none.
    parallel: DDP, gradient accumulation, precision (`training.dist`); the decoder and discriminator are
        small, so they are always replicated (DDP), never sharded.
    ckpt_every: steps between checkpoints (a killed run resumes from the last one).
    log_every: steps between log lines.
    """

    steps: int = 2000
    batch: int = 32
    lr: float = 1e-3
    gan_weight: float = 0.1
    gan_start: int = 500
    full_l1: float = 1.0
    max_seconds: float | None = None
    parallel: dist.Parallel = field(default_factory=dist.Parallel)
    ckpt_every: int = 500
    log_every: int = 25


class PatchDiscriminator(nn.Module):
    """A small PatchGAN for 64x64 images in [-1, 1]: one logit per 8x8 patch."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1),
            nn.GroupNorm(8, 2 * w),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1),
            nn.GroupNorm(8, 4 * w),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def d8(x: torch.Tensor) -> torch.Tensor:
    """The paper's 8x downsampling of decoder outputs."""
    return F.avg_pool2d(x, 8)


def teacher_decode(vae_kl, latents: torch.Tensor) -> torch.Tensor:
    """Teacher decoder on U-Net-space latents."""
    return vae_kl.decode(latents / vae_kl.config.scaling_factor).sample


def distill_decoder(cfg: DecoderConfig, out: Path, vae_kl, student, latent_pool: torch.Tensor, seed: int = 0):
    """Train `student` (AutoencoderTiny) to match `vae_kl`'s decoder on `latent_pool` (N, 4, h, w), U-Net space.

    Args:
        cfg: recipe settings.
        out: run folder (resumable).
        vae_kl: the teacher AutoencoderKL (frozen).
        student: the AutoencoderTiny whose decoder is trained.
        latent_pool: latents of real images and of teacher samples, already scaled.
        seed: batch sampling seed.
    """
    vae_kl.requires_grad_(False).eval()
    student.decoder.train()
    d, par, dev = dist.init(), cfg.parallel, latent_pool.device
    disc = PatchDiscriminator().to(dev)
    dec_m, disc_m = d.wrap(student.decoder), d.wrap(disc)
    opt_g = torch.optim.Adam(student.decoder.parameters(), cfg.lr, betas=(0.5, 0.99))
    opt_d = torch.optim.Adam(disc.parameters(), cfg.lr, betas=(0.5, 0.99))
    last = [m for m in student.decoder.modules() if isinstance(m, nn.Conv2d)][-1].weight
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (teacher image, student image) of this step

    def g_loss(idx, use_gan):
        z = latent_pool[idx.to(dev)]
        with torch.no_grad():
            target = teacher_decode(vae_kl, z).clamp(-1, 1).float()
        fake = dec_m(z).float()  # AutoencoderTiny.decode is its decoder
        pairs.append((target, fake.detach()))
        rec = F.l1_loss(d8(fake), d8(target)) + cfg.full_l1 * F.l1_loss(fake, target)
        if not use_gan:
            return rec, {"rec": rec.item()}
        disc.requires_grad_(False)  # the generator's adversarial term reaches no discriminator weight
        adv = -disc(fake).mean()
        disc.requires_grad_(True)
        # VQGAN's adaptive weight: || dL_rec / dw || / || dL_adv / dw || at the last layer.
        g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
        g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0].norm()
        lam = (g_rec / (g_adv + 1e-4)).clamp(0, 1e4).detach() * cfg.gan_weight
        return rec + lam * adv, {"rec": rec.item(), "adv": adv.item(), "lam": lam.item()}

    def d_loss(target, fake):
        real_logit, fake_logit = disc_m(torch.cat([target, fake])).chunk(2)
        return F.relu(1 - real_logit).mean() + F.relu(1 + fake_logit).mean(), {}

    progress = Progress(cfg.steps, cfg.max_seconds, d)

    def step(k: int) -> dict:
        set_lr(opt_g, cosine_lr(cfg.lr, k, progress(k)))
        g = torch.Generator().manual_seed(seed * 7919 + k)
        micro = [
            [*m, cfg.gan_weight > 0 and k >= cfg.gan_start]
            for m in d.micro([torch.randint(0, len(latent_pool), (cfg.batch,), generator=g)], par.grad_accum)
        ]
        pairs.clear()
        opt_g.zero_grad(set_to_none=True)
        metrics = d.accumulate([dec_m], micro, g_loss, dev, par.precision)
        opt_g.step()
        if cfg.gan_weight > 0 and k >= cfg.gan_start - 100:  # the discriminator gets a head start
            opt_d.zero_grad(set_to_none=True)
            metrics["d_loss"] = d.accumulate([disc_m], [list(p) for p in pairs], d_loss, dev, par.precision)["loss"]
            opt_d.step()
        return metrics

    run_loop(
        "decoder",
        out,
        LoopConfig(cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, max_seconds=cfg.max_seconds),
        step,
        {"decoder": student.decoder, "disc": disc},
        {"g": opt_g, "d": opt_d},
        d=d,
    )
    student.decoder.eval()
    return student


@torch.no_grad()
def decoder_report(vae_kl, student, latents: torch.Tensor) -> dict:
    """PSNR / SSIM of the student against the teacher decoder, parameter ratio, CPU speed ratio."""
    import time

    from sdxs_edge.models import count_parameters

    t_img = teacher_decode(vae_kl, latents).clamp(-1, 1)
    s_img = student.decode(latents).sample.clamp(-1, 1)
    a, b = (t_img + 1) / 2, (s_img + 1) / 2
    mse = (a - b).square().mean().item()

    def timeit(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t) / 3

    import copy

    # A fixed pixel budget: 16 latents of SHAPES-64's 8x8, one of a 512x512 model's 64x64.
    z1 = latents[: max(1, 16 * 64 // (latents.shape[-1] * latents.shape[-2]))].cpu()
    vae_cpu, student_cpu = copy.deepcopy(vae_kl).cpu(), copy.deepcopy(student).cpu()
    t_teacher = timeit(lambda: teacher_decode(vae_cpu, z1))
    t_student = timeit(lambda: student_cpu.decode(z1))
    p_teacher = count_parameters(vae_kl.decoder) + count_parameters(vae_kl.post_quant_conv)
    p_student = count_parameters(student.decoder)
    return {
        "psnr_vs_teacher": float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12)))),
        "ssim_vs_teacher": ssim(a, b),
        "teacher_params": p_teacher,
        "student_params": p_student,
        "param_ratio": p_teacher / p_student,
        "cpu_speed_ratio": t_teacher / t_student,
    }


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """Mean SSIM (Wang et al. 2004) with a uniform window, images in [0, 1]."""
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = F.avg_pool2d(a, window, 1), F.avg_pool2d(b, window, 1)
    va = F.avg_pool2d(a * a, window, 1) - mu_a**2
    vb = F.avg_pool2d(b * b, window, 1) - mu_b**2
    cov = F.avg_pool2d(a * b, window, 1) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return float(s.mean())
