"""One-step training (arXiv 2403.16627 Sec. 3.3): feature-matching warm-up, then segmented score
distillation.

a. Warm-up (Sec. 3.3, Fig. 6): noise -> image pairs from the teacher's ODE sampler (fixed noise, N Euler
   steps, guidance). The student maps the same noise to x0 in one step (the SDXS rule at t = 999) and is
   pulled towards the teacher's x0 by a DISTS-inspired SSIM between multi-level feature maps of a frozen
   encoder, weighted per level. Encoders: the teacher U-Net's encoder ("unet") or a small frozen CNN
   ("cnn"). `loss="mse"` is the plain MSE baseline of the paper's Fig. 6 comparison.
b. Segmented score distillation (Algorithm 1, Fig. 3; Diff-Instruct / IKL, in DMD's normalised form): an
   online DM initialised from the offline (teacher) DM learns the student's output distribution with the
   denoising loss, alternating with student updates. The student's gradient is the score difference
   (online minus offline, offline with guidance) for t in [0, alpha*T] and lambda_FM * feature matching for
   t in (alpha*T, T]; alpha starts near 1 and lambda_FM high, both annealed over training.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdxs_edge import sampler
from sdxs_edge.atomic import atomic_file
from training.loop import LoopConfig, Progress, cosine_lr, run_loop, set_lr


# ---- teacher ODE pairs ---------------------------------------------------------------------------------
@torch.no_grad()
def make_ode_pairs(
    pipe, prompts: list[str], steps: int, guidance: float, batch: int = 64, seed: int = 0
) -> dict[str, torch.Tensor]:
    """(noise, ids, x0) triples from the teacher's multi-step sampler with classifier-free guidance."""
    from tqdm.auto import tqdm

    noises, ids, x0s = [], [], []
    for i in tqdm(range(0, len(prompts), batch), desc="ode pairs"):
        p = prompts[i : i + batch]
        noise = pipe.noise(len(p), seed * 1_000_003 + i)
        ctx, unc = pipe.encode_prompt(p), pipe.encode_prompt([""] * len(p))
        x0s.append(pipe._multi_step(noise.to(ctx.device), ctx, unc, steps, guidance).cpu())
        noises.append(noise)
        ids.append(pipe.tokenize(p).int())
    return {"noise": torch.cat(noises), "ids": torch.cat(ids), "x0": torch.cat(x0s)}


PAIR_CAPTION_SEED = 10_000  # caption stream of the pair chunks: seeds 10000 + i, disjoint from evaluation


def ode_pair_chunks(
    pipe,
    out: Path,
    n: int,
    steps: int,
    guidance: float,
    chunk: int = 2048,
    batch: int = 64,
    captions: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """`n` teacher ODE pairs, built in chunks of `chunk` that are each written atomically under `out`.

    A killed run keeps its finished chunks and resumes with the next one; chunk i draws its captions from
    the evaluation-disjoint stream seed PAIR_CAPTION_SEED + i and its noise from seed i + 1, so the pairs do
    not depend on how often the build was interrupted. With `captions` (a prompt file's lines) pair j
    takes caption j modulo their count instead.
    """
    from safetensors.torch import load_file, save_file

    from sdxs_edge import shapes

    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range((n + chunk - 1) // chunk):
        f = out / f"chunk-{i:03d}-{chunk}-{steps}-{guidance:g}.safetensors"
        if not f.is_file():
            size = min(chunk, n - i * chunk)
            if captions:
                caps = [captions[(i * chunk + k) % len(captions)] for k in range(size)]
            else:
                caps = [s.caption for s in shapes.eval_scenes(size, seed=PAIR_CAPTION_SEED + i)]
            p = make_ode_pairs(pipe, caps, steps, guidance, batch=batch, seed=i + 1)
            with atomic_file(f) as tmp:
                save_file(p, str(tmp))
        parts.append(load_file(str(f)))
    return {k: torch.cat([p[k] for p in parts])[:n] for k in parts[0]}


# ---- feature encoders and the SSIM feature loss -----------------------------------------------------
class UNetEncoder(nn.Module):
    """The teacher U-Net's encoder (conv_in + down blocks) at a small timestep, frozen."""

    def __init__(self, unet, timestep: int = 50):
        super().__init__()
        self.unet = unet.requires_grad_(False).eval()
        self.timestep = timestep

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> list[torch.Tensor]:
        u = self.unet
        t = torch.full((x.shape[0],), self.timestep, device=x.device)
        emb = u.time_embedding(u.time_proj(t).to(x.dtype))
        h = u.conv_in(x)
        feats = [x, h]
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(h, emb, encoder_hidden_states=ctx)
            else:
                h, _ = block(h, emb)
            feats.append(h)
        return feats


class SmallCNN(nn.Module):
    """A frozen random conv pyramid on latents; random features carry layout and texture statistics."""

    def __init__(self, width: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        chans = [4, width, 2 * width, 4 * width]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1) for i, (a, b) in enumerate(zip(chans, chans[1:]))
        )
        for c in self.convs:
            nn.init.normal_(c.weight, 0, (2 / (c.in_channels * 9)) ** 0.5, generator=g)
            nn.init.zeros_(c.bias)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> list[torch.Tensor]:
        feats = [x]
        for c in self.convs:
            x = F.silu(c(x))
            feats.append(x)
        return feats


def ssim_feature_loss(
    fa: list[torch.Tensor], fb: list[torch.Tensor], weights: list[float] | None = None
) -> torch.Tensor:
    """Per-sample DISTS-inspired loss: 1 - (luminance + structure)/2 per channel over space, per level.

    Returns a (B,) tensor.
    """
    c1, c2 = 1e-6, 1e-6
    weights = weights or [1.0] * len(fa)
    total = 0.0
    for w, a, b in zip(weights, fa, fb):
        a, b = a.flatten(2), b.flatten(2)
        ma, mb = a.mean(-1), b.mean(-1)
        va, vb = a.var(-1, unbiased=False), b.var(-1, unbiased=False)
        cov = ((a - ma[..., None]) * (b - mb[..., None])).mean(-1)
        lum = (2 * ma * mb + c1) / (ma**2 + mb**2 + c1)
        struct = (2 * cov + c2) / (va + vb + c2)
        total = total + w * (1 - 0.5 * (lum + struct)).mean(-1)
    return total / sum(weights)


def feature_matching_loss(
    encoder: nn.Module | None, pred: torch.Tensor, target: torch.Tensor, ctx: torch.Tensor, weights=None
) -> torch.Tensor:
    """Per-sample loss between one-step output `pred` and teacher sample `target` (encoder None = MSE)."""
    if encoder is None:
        return (pred - target).square().flatten(1).mean(1)
    with torch.no_grad():
        ft = encoder(target, ctx)
    return ssim_feature_loss(encoder(pred, ctx), ft, weights)


def one_step_x0(student, noise: torch.Tensor, ctx: torch.Tensor, c: sampler.OneStepConstants) -> torch.Tensor:
    """The SDXS rule with a trainable U-Net: x0 in U-Net latent space."""
    return sampler.sample_one_step(
        lambda x, t, cx: student(x, torch.full((x.shape[0],), t, device=x.device), cx).sample, noise, ctx, c
    )


# ---- a. warm-up ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WarmupConfig:
    """Args:
    steps: optimizer steps.
    batch: pairs per step.
    lr: AdamW learning rate.
    loss: "ssim" (feature matching) or "mse" (baseline).
    encoder: "unet" (teacher encoder) or "cnn" (small frozen CNN).
    level_weights: per-level weights of the feature loss (None = equal).
    max_seconds: wall-clock budget (the loop checkpoints and stops when it is spent); None = none.
    ckpt_every: steps between checkpoints (a killed run resumes from the last one).
    log_every: steps between log lines.
    """

    steps: int = 1500
    batch: int = 32
    lr: float = 1e-4
    loss: str = "ssim"
    encoder: str = "unet"
    level_weights: tuple[float, ...] | None = None
    max_seconds: float | None = None
    ckpt_every: int = 500
    log_every: int = 25


def make_encoder(kind: str, teacher_unet) -> nn.Module | None:
    if kind == "unet":
        return UNetEncoder(teacher_unet)
    if kind == "cnn":
        return SmallCNN()
    raise ValueError(f"unknown feature encoder {kind!r} (unet, cnn)")


def warmup(
    cfg: WarmupConfig,
    out: Path,
    student,
    text_encoder,
    teacher_unet,
    pairs: dict,
    consts: sampler.OneStepConstants,
    seed: int = 0,
):
    """Feature-matching warm-up of a one-step student on teacher ODE pairs."""
    text_encoder.requires_grad_(False).eval()
    encoder = None if cfg.loss == "mse" else make_encoder(cfg.encoder, teacher_unet).to(pairs["noise"].device)
    opt = torch.optim.AdamW(student.parameters(), cfg.lr, weight_decay=0.0)
    student.train()
    n = len(pairs["noise"])
    dev = pairs["noise"].device

    progress = Progress(cfg.steps, cfg.max_seconds)

    def step(k: int) -> dict:
        set_lr(opt, cosine_lr(cfg.lr, k, progress(k), floor=0.3))
        g = torch.Generator().manual_seed(seed * 1_000_037 + k)
        idx = torch.randint(0, n, (cfg.batch,), generator=g).to(dev)
        with torch.no_grad():
            ctx = text_encoder(pairs["ids"][idx].long())[0]
        pred = one_step_x0(student, pairs["noise"][idx], ctx, consts)
        loss = feature_matching_loss(
            encoder, pred, pairs["x0"][idx], ctx, cfg.level_weights and list(cfg.level_weights)
        ).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            mse = (pred - pairs["x0"][idx]).square().mean()
        return {"loss": loss.item(), "mse": mse.item()}

    run_loop(
        "warmup",
        out,
        LoopConfig(cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, max_seconds=cfg.max_seconds),
        step,
        {"unet": student},
        {"opt": opt},
    )
    return student.eval()


# ---- b. segmented score distillation ----------------------------------------------------------------------
@dataclass(frozen=True)
class SSDConfig:
    """Args:
    steps: student updates (each followed by `online_updates` online-DM updates).
    batch: samples per step.
    lr: student AdamW learning rate.
    online_lr: online DM AdamW learning rate.
    online_updates: online-DM denoising updates per student update.
    guidance: classifier-free guidance of the offline (teacher) score.
    alpha_start, alpha_end: segment boundary alpha (score distillation for t <= alpha*T), annealed linearly.
    fm_start, fm_end: lambda_FM, annealed with a cosine.
    t_min: smallest timestep sampled for score distillation (very small t carries no signal).
    encoder: feature encoder of the feature-matching segment ("unet" or "cnn").
    max_seconds: wall-clock budget (the loop checkpoints and stops when it is spent); None = none.
    ckpt_every: steps between checkpoints (a killed run resumes from the last one).
    log_every: steps between log lines.
    """

    steps: int = 800
    batch: int = 32
    lr: float = 2e-5
    online_lr: float = 1e-4
    online_updates: int = 1
    guidance: float = 4.0
    alpha_start: float = 0.95
    alpha_end: float = 0.7
    fm_start: float = 10.0
    fm_end: float = 1.0
    t_min: int = 20
    encoder: str = "unet"
    max_seconds: float | None = None
    ckpt_every: int = 200
    log_every: int = 25


def anneal(cfg: SSDConfig, p: float) -> tuple[float, float]:
    """(alpha, lambda_FM) at training progress p in [0, 1]."""
    alpha = cfg.alpha_start + (cfg.alpha_end - cfg.alpha_start) * p
    lam = cfg.fm_end + (cfg.fm_start - cfg.fm_end) * 0.5 * (1 + math.cos(math.pi * p))
    return alpha, lam


def _x0(pred: torch.Tensor, xt: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 from a diffusion model's output at abar_t = a (epsilon or v parameterisation)."""
    if prediction_type == "v_prediction":
        return a.sqrt() * xt - (1 - a).sqrt() * pred
    return (xt - (1 - a).sqrt() * pred) / a.sqrt()


def _target(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The denoising target of a diffusion model with that parameterisation."""
    return a.sqrt() * eps - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else eps


def _score_difference(
    offline_unet, online, xt, a, t, ctx, uncond, guidance: float, x0, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """DMD's normalised form of the Diff-Instruct gradient: (x0 of the online DM - x0 of the guided
    offline DM), divided by the mean distance of the student's x0 from the offline one."""
    e_u, e_c = offline_unet(
        torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([uncond.expand_as(ctx), ctx])
    ).sample.chunk(2)
    e_real = e_u + guidance * (e_c - e_u)
    e_fake = online(xt, t, ctx).sample
    x0_real = _x0(e_real, xt, a, prediction_type)
    x0_fake = _x0(e_fake, xt, a, prediction_type)
    grad = (x0_fake - x0_real) / (x0 - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-4)
    return torch.nan_to_num(grad)


def _noised(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, g: torch.Generator):
    """x0 noised to timesteps t (forward process), and the alphas_cumprod it used, shaped to broadcast."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g).to(x0.device), a


def _update_online(online, opt, x0: torch.Tensor, ctx, alphas_cumprod, cfg: SSDConfig, g, prediction: str) -> float:
    """The online DM's denoising updates on the student's current outputs; returns the last loss."""
    for _ in range(cfg.online_updates):
        t = torch.randint(0, len(alphas_cumprod), (cfg.batch,), generator=g).to(x0.device)
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(online(xt, t, ctx).sample, _target(x0, eps, a, prediction))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(online.parameters(), 1.0)
        opt.step()
    return loss.item()


def score_distill(
    cfg: SSDConfig,
    out: Path,
    student,
    text_encoder,
    offline_unet,
    pairs: dict,
    consts: sampler.OneStepConstants,
    alphas_cumprod: torch.Tensor,
    empty_ids: torch.Tensor,
    seed: int = 0,
    online_init=None,
    teacher_prediction: str = "epsilon",
):
    """Segmented score distillation of a (warmed-up) one-step student: only its parameters with
    requires_grad train (all, or an injected LoRA). The online DM starts as a copy of `online_init` (default:
    the offline DM; a style LoRA distillation starts it from the teacher without the LoRA).
    `teacher_prediction` is the offline DM's parameterisation ("epsilon" or "v_prediction"), which the
    online DM inherits.
    """
    text_encoder.requires_grad_(False).eval()
    offline_unet.requires_grad_(False).eval()
    online = copy.deepcopy(online_init if online_init is not None else offline_unet).requires_grad_(True).train()
    dev = pairs["noise"].device
    encoder = make_encoder(cfg.encoder, offline_unet).to(dev)
    alphas_cumprod = alphas_cumprod.to(dev)
    empty_ids = empty_ids.to(dev)
    params = [p for p in student.parameters() if p.requires_grad]
    opt_s = torch.optim.AdamW(params, cfg.lr, weight_decay=0.0)
    opt_o = torch.optim.AdamW(online.parameters(), cfg.online_lr, weight_decay=0.0)
    student.train()
    T = len(alphas_cumprod)
    n = len(pairs["noise"])
    with torch.no_grad():
        uncond = text_encoder(empty_ids[None])[0]

    progress = Progress(cfg.steps, cfg.max_seconds)

    def step(k: int) -> dict:
        alpha, lam = anneal(cfg, progress(k))
        g = torch.Generator().manual_seed(seed * 1_000_039 + k)
        idx = torch.randint(0, n, (cfg.batch,), generator=g).to(dev)
        with torch.no_grad():
            ctx = text_encoder(pairs["ids"][idx].long())[0]
        x0 = one_step_x0(student, pairs["noise"][idx], ctx, consts)
        t = torch.randint(cfg.t_min, T, (cfg.batch,), generator=g).to(dev)
        sd_mask = (t <= alpha * T).float()
        # Score-difference segment (DMD's normalised form of the Diff-Instruct gradient).
        with torch.no_grad():
            xt, a = _noised(x0.detach(), t, alphas_cumprod, g)
            grad = _score_difference(
                offline_unet, online, xt, a, t, ctx, uncond, cfg.guidance, x0.detach(), teacher_prediction
            )
        sd = 0.5 * (x0 - (x0 - grad).detach()).square().flatten(1).mean(1)
        fm = feature_matching_loss(encoder, x0, pairs["x0"][idx], ctx)
        loss = (sd_mask * sd + (1 - sd_mask) * lam * fm).mean()
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt_s.step()
        # Online DM: denoising loss on the student's current outputs.
        o_loss = _update_online(online, opt_o, x0.detach(), ctx, alphas_cumprod, cfg, g, teacher_prediction)
        return {
            "loss": loss.item(),
            "sd": float((sd.detach() * sd_mask).sum() / sd_mask.sum().clamp_min(1)),
            "fm": float(fm.mean()),
            "online": o_loss,
            "alpha": alpha,
            "lambda_fm": lam,
        }

    run_loop(
        "score-distill",
        out,
        LoopConfig(cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, max_seconds=cfg.max_seconds),
        step,
        {"unet": student, "online": online},
        {"student": opt_s, "online": opt_o},
    )
    return student.eval()
