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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdxs_edge import sampler
from sdxs_edge.atomic import atomic_file
from training import dist
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
    d: dist.DistInfo | None = None,
) -> dict[str, torch.Tensor]:
    """`n` teacher ODE pairs, built in chunks of `chunk` that are each written atomically under `out`.

    A killed run keeps its finished chunks and resumes with the next one; chunk i draws its captions from
    the evaluation-disjoint stream seed PAIR_CAPTION_SEED + i and its noise from seed i + 1, so the pairs do
    not depend on how often the build was interrupted. With `captions` (a prompt file's lines) pair j
    takes caption j modulo their count instead. Under N processes (`d`) rank r builds chunks r, r + N, ...
    and every rank then reads them all.
    """
    from safetensors.torch import load_file, save_file

    from sdxs_edge import shapes

    d = d or dist.DistInfo()
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"chunk-{i:03d}-{chunk}-{steps}-{guidance:g}.safetensors" for i in range((n + chunk - 1) // chunk)]
    for i, f in enumerate(files):
        if not f.is_file() and i % d.world == d.rank:
            size = min(chunk, n - i * chunk)
            if captions:
                caps = [captions[(i * chunk + k) % len(captions)] for k in range(size)]
            else:
                caps = [s.caption for s in shapes.eval_scenes(size, seed=PAIR_CAPTION_SEED + i)]
            p = make_ode_pairs(pipe, caps, steps, guidance, batch=batch, seed=i + 1)
            with atomic_file(f) as tmp:
                save_file(p, str(tmp))
    d.barrier()
    parts = [load_file(str(f)) for f in files]
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
    parallel: DDP / FSDP, gradient accumulation, precision, gradient checkpointing (`training.dist`).
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
    parallel: dist.Parallel = field(default_factory=dist.Parallel)
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
    """Feature-matching warm-up of a one-step student on teacher ODE pairs; returns the trained student
    (under FSDP a gathered, unsharded copy: use the returned model)."""
    text_encoder.requires_grad_(False).eval()
    d, par = dist.init(), cfg.parallel
    encoder = None if cfg.loss == "mse" else make_encoder(cfg.encoder, teacher_unet).to(pairs["noise"].device)
    student.train()
    student_m = dist.trainable(d, student, par)
    opt = torch.optim.AdamW(student.parameters(), cfg.lr, weight_decay=0.0)
    n = len(pairs["noise"])
    dev = pairs["noise"].device
    weights = cfg.level_weights and list(cfg.level_weights)

    def loss_fn(idx):
        idx = idx.to(dev)
        with torch.no_grad():
            ctx = text_encoder(pairs["ids"][idx].long())[0]
        pred = one_step_x0(student_m, pairs["noise"][idx], ctx, consts).float()
        loss = feature_matching_loss(encoder, pred, pairs["x0"][idx], ctx, weights).mean()
        return loss, {"mse": (pred.detach() - pairs["x0"][idx]).square().mean().item()}

    progress = Progress(cfg.steps, cfg.max_seconds, d)

    def step(k: int) -> dict:
        set_lr(opt, cosine_lr(cfg.lr, k, progress(k), floor=0.3))
        g = torch.Generator().manual_seed(seed * 1_000_037 + k)
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        metrics = d.accumulate([student_m], d.micro([idx], par.grad_accum), loss_fn, dev, par.precision)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        return metrics

    run_loop(
        "warmup",
        out,
        LoopConfig(cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, max_seconds=cfg.max_seconds),
        step,
        {"unet": student},
        {"opt": opt},
        d=d,
    )
    return dist.released(student).eval()


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
    fresh_noise: the score-distillation samples (t <= alpha*T) take fresh input noise every step instead
        of their pair's noise; the feature-matching samples keep the pair's (their target is its teacher
        sample). With few pairs the student then never sees the same noise twice in that segment.
    max_seconds: wall-clock budget (the loop checkpoints and stops when it is spent); None = none.
    parallel: DDP / FSDP of the student and the online DM, gradient accumulation, precision, gradient
        checkpointing (`training.dist`).
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
    fresh_noise: bool = False
    max_seconds: float | None = None
    parallel: dist.Parallel = field(default_factory=dist.Parallel)
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


def _update_online(online_m, opt, x0s, ctxs, draws, acp, d, cfg: SSDConfig, prediction: str) -> float:
    """One denoising update of the online DM on the student's current outputs: `x0s`, `ctxs` are this
    rank's micro-batches, `draws` the global (t, eps) of this update. Returns its loss."""
    dev = x0s[0].device

    def loss_fn(x0, ctx, t, eps):
        t, eps = t.to(dev), eps.to(dev)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return F.mse_loss(online_m(xt, t, ctx).sample.float(), _target(x0, eps, a, prediction)), {}

    micro = [[x, c, *te] for x, c, te in zip(x0s, ctxs, d.micro(list(draws), cfg.parallel.grad_accum))]
    opt.zero_grad(set_to_none=True)
    loss = d.accumulate([online_m], micro, loss_fn, dev, cfg.parallel.precision)["loss"]
    torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
    opt.step()
    return loss


def _ssd_draws(cfg: SSDConfig, k: int, seed: int, n: int, T: int, shape) -> tuple[list, list]:
    """Step k's global random draws: the student's (pair index, t, noise for x_t, fresh input noise) and,
    per online update, (t, eps). The fresh noise is drawn last, so the other draws do not depend on
    `fresh_noise`."""
    g = torch.Generator().manual_seed(seed * 1_000_039 + k)
    student = [
        torch.randint(0, n, (cfg.batch,), generator=g),
        torch.randint(cfg.t_min, T, (cfg.batch,), generator=g),
        torch.randn((cfg.batch, *shape), generator=g),
    ]
    online = [
        (torch.randint(0, T, (cfg.batch,), generator=g), torch.randn((cfg.batch, *shape), generator=g))
        for _ in range(cfg.online_updates)
    ]
    student.append(torch.randn((cfg.batch, *shape), generator=g))
    return student, online


def student_noise(pair_noise: torch.Tensor, fresh: torch.Tensor, sd_mask: torch.Tensor) -> torch.Tensor:
    """The student's input noise with `fresh_noise`: fresh where the sample is in the score-distillation
    segment (`sd_mask` 1), the pair's where it is in the feature-matching one."""
    m = sd_mask.view(-1, *[1] * (pair_noise.dim() - 1))
    return m * fresh + (1 - m) * pair_noise


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
    online DM inherits. Returns the trained student (under FSDP a gathered, unsharded copy).
    """
    text_encoder.requires_grad_(False).eval()
    offline_unet.requires_grad_(False).eval()
    d, par = dist.init(), cfg.parallel
    online = copy.deepcopy(online_init if online_init is not None else offline_unet).requires_grad_(True).train()
    dev = pairs["noise"].device
    encoder = make_encoder(cfg.encoder, offline_unet).to(dev)
    acp = alphas_cumprod.to(dev)
    student.train()
    student_m, online_m = dist.trainable(d, student, par), dist.trainable(d, online, par)
    params = [p for p in student.parameters() if p.requires_grad]
    opt_s = torch.optim.AdamW(params, cfg.lr, weight_decay=0.0)
    opt_o = torch.optim.AdamW(online.parameters(), cfg.online_lr, weight_decay=0.0)
    T, n, progress, x0s, ctxs = len(acp), len(pairs["noise"]), Progress(cfg.steps, cfg.max_seconds, d), [], []
    with torch.no_grad():
        uncond = text_encoder(empty_ids.to(dev)[None])[0]

    def loss_fn(idx, t, noise, fresh, alpha, lam):
        idx, t = idx.to(dev), t.to(dev)
        with torch.no_grad():
            ctx = text_encoder(pairs["ids"][idx].long())[0]
        sd_mask = (t <= alpha * T).float()
        z = student_noise(pairs["noise"][idx], fresh.to(dev), sd_mask) if cfg.fresh_noise else pairs["noise"][idx]
        x0 = one_step_x0(student_m, z, ctx, consts).float()
        with torch.no_grad():  # score-difference segment (DMD's normalised form of the Diff-Instruct gradient)
            a = acp[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0.detach() + (1 - a).sqrt() * noise.to(dev)
            grad = _score_difference(
                offline_unet, online, xt, a, t, ctx, uncond, cfg.guidance, x0.detach(), teacher_prediction
            ).float()
        sd = 0.5 * (x0 - (x0 - grad).detach()).square().flatten(1).mean(1)
        fm = feature_matching_loss(encoder, x0, pairs["x0"][idx], ctx)
        x0s.append(x0.detach())
        ctxs.append(ctx)
        sd_mean = float((sd.detach() * sd_mask).sum() / sd_mask.sum().clamp_min(1))
        return (sd_mask * sd + (1 - sd_mask) * lam * fm).mean(), {"sd": sd_mean, "fm": float(fm.detach().mean())}

    def step(k: int) -> dict:
        alpha, lam = anneal(cfg, progress(k))
        draws, online_draws = _ssd_draws(cfg, k, seed, n, T, pairs["noise"].shape[1:])
        x0s.clear()
        ctxs.clear()
        micro = [[*m, alpha, lam] for m in d.micro(draws, par.grad_accum)]
        opt_s.zero_grad(set_to_none=True)
        metrics = d.accumulate([student_m], micro, loss_fn, dev, par.precision)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt_s.step()
        for od in online_draws:  # online DM: denoising loss on the student's current outputs
            metrics["online"] = _update_online(online_m, opt_o, x0s, ctxs, od, acp, d, cfg, teacher_prediction)
        return {**metrics, "alpha": alpha, "lambda_fm": lam}

    run_loop(
        "score-distill",
        out,
        LoopConfig(cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, max_seconds=cfg.max_seconds),
        step,
        {"unet": student, "online": online},
        {"student": opt_s, "online": opt_o},
        d=d,
    )
    return dist.released(student).eval()
