"""U-Net block removal with output and feature knowledge distillation (arXiv 2403.16627 Sec. 3.2,
Fig. 2b; after BK-SDM).

The student is the teacher with blocks removed (`sdxs_edge.presets.block_removed`), initialised from
the teacher where layers correspond (`SDXS_LAYER_MAP`, data). Loss, with no denoising term:

    L = || eps_student(x_t, t, c) - eps_teacher(x_t, t, c) ||^2
        + lambda_F * sum_blocks || f_student_block - f_teacher_block ||^2      (SDXS_FEATURE_PAIRS)

The student's last down stage has no downsampler while the teacher's stage of the same index has one, so
that pair is compared at the coarser of the two resolutions (`feature_mse`: the finer map average-pooled).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sdxs_edge.presets import SDXS_FEATURE_PAIRS, SDXS_LAYER_MAP, block_removed
from training import dist
from training.loop import LoopConfig, Progress, cosine_lr, run_loop, set_lr


@dataclass(frozen=True)
class UNetKDConfig:
    """Args:
    steps: optimizer steps.
    batch: latents per step.
    lr: AdamW peak learning rate (100-step warm-up, then cosine decay to 30%).
    feature_weight: lambda_F, the weight of the feature-KD term.
    cfg_dropout: share of empty captions, so the student keeps classifier-free guidance.
    max_seconds: wall-clock budget (the loop checkpoints and stops when it is spent); None = none.
    parallel: DDP / FSDP, gradient accumulation, precision, gradient checkpointing (`training.dist`).
    ckpt_every: steps between checkpoints (a killed run resumes from the last one).
    log_every: steps between log lines.
    """

    steps: int = 2000
    batch: int = 64
    lr: float = 3e-4
    feature_weight: float = 1.0
    cfg_dropout: float = 0.1
    max_seconds: float | None = None
    parallel: dist.Parallel = field(default_factory=dist.Parallel)
    ckpt_every: int = 500
    log_every: int = 25


def build_student(
    teacher_unet, layer_map: Mapping[str, str] = SDXS_LAYER_MAP, config: Mapping | None = None
) -> tuple[torch.nn.Module, dict]:
    """Block-removed student of `teacher_unet` (or a U-Net of `config`), initialised from it through
    `layer_map` (tensors whose shapes match).

    Returns:
        (student, report) where report counts the tensors copied and lists student tensors left at
        random init (none, for an SD-2.1-topology teacher).
    """
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel(**(dict(config) if config is not None else block_removed(teacher_unet.config)))
    t_sd = teacher_unet.state_dict()
    s_sd = student.state_dict()
    copied, missing = 0, []
    for name, tensor in s_sd.items():
        src = None
        for s_prefix, t_prefix in layer_map.items():
            if name == s_prefix or name.startswith(s_prefix + "."):
                src = t_prefix + name[len(s_prefix) :]
                break
        if src is not None and src in t_sd and t_sd[src].shape == tensor.shape:
            s_sd[name] = t_sd[src].clone()
            copied += 1
        else:
            missing.append(name)
    student.load_state_dict(s_sd)
    return student, {"copied": copied, "random_init": missing}


class FeatureTap:
    """Records the outputs of named sub-blocks via forward hooks (first element of tuple outputs)."""

    def __init__(self, model: torch.nn.Module, names):
        self.out: dict[str, torch.Tensor] = {}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def f(_m, _i, o):
            self.out[name] = o[0] if isinstance(o, tuple) else o

        return f

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def feature_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE of two feature maps with the same channels, the finer one average-pooled to the coarser size."""
    a, b = a.float(), b.float()
    if a.shape[-2:] != b.shape[-2:]:
        size = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
        a, b = F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)
    return F.mse_loss(a, b)


def _kd_draws(cfg: UNetKDConfig, seed: int, n: int, T: int, shape) -> list[torch.Tensor]:
    """A step's global random draws: cache index, posterior noise, caption dropout, timestep, noise."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (cfg.batch,), generator=g)
    e0 = torch.randn((cfg.batch, *shape), generator=g)
    drop = torch.rand(cfg.batch, generator=g) < cfg.cfg_dropout
    t = torch.randint(0, T, (cfg.batch,), generator=g)
    return [idx, e0, drop, t, torch.randn(e0.shape, generator=g)]


def distill_unet(
    cfg: UNetKDConfig,
    out: Path,
    teacher_unet,
    text_encoder,
    student,
    cache: dict,
    empty_ids: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    seed: int = 0,
):
    """Train `student` against `teacher_unet` on noised latents from `cache` (see the teacher trainer);
    returns the trained student (under FSDP a gathered, unsharded copy: use the returned model).

    Args:
        cfg: recipe settings.
        out: run folder (resumable).
        teacher_unet: frozen teacher U-Net.
        text_encoder: frozen text encoder shared by teacher and student.
        student: the block-removed U-Net being trained.
        cache: latent cache with "mean", "std", "ids", "scaling_factor".
        empty_ids: token ids of "" (classifier-free guidance dropout).
        alphas_cumprod: the noise schedule's abar_t.
        seed: sampling seed.
    """
    teacher_unet.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    student.train()
    d, par = dist.init(), cfg.parallel
    pairs = dict(SDXS_FEATURE_PAIRS)
    tap_s, tap_t = FeatureTap(student, pairs.keys()), FeatureTap(teacher_unet, pairs.values())
    student_m = dist.trainable(d, student, par)
    opt = torch.optim.AdamW(student.parameters(), cfg.lr, weight_decay=0.0)
    scale = float(cache["scaling_factor"])
    n = cache["mean"].shape[0]
    dev = cache["mean"].device
    acp = alphas_cumprod.to(dev)
    empty_ids = empty_ids.to(dev)

    def loss_fn(idx, e0, drop, t, e):
        idx, t = idx.to(dev), t.to(dev)
        z0 = (cache["mean"][idx] + cache["std"][idx] * e0.to(dev)) * scale
        ids = cache["ids"][idx].long()
        ids[drop.to(dev)] = empty_ids
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * e.to(dev)
        with torch.no_grad():
            ctx = text_encoder(ids)[0]
            target = teacher_unet(zt, t, ctx).sample.float()
        out_kd = F.mse_loss(student_m(zt, t, ctx).sample.float(), target)
        feat_kd = sum(feature_mse(tap_s.out[s], tap_t.out[t_]) for s, t_ in pairs.items())
        return out_kd + cfg.feature_weight * feat_kd, {"out_kd": out_kd.item(), "feat_kd": float(feat_kd.detach())}

    progress = Progress(cfg.steps, cfg.max_seconds, d)

    def step(k: int) -> dict:
        set_lr(opt, cosine_lr(cfg.lr, k, progress(k), floor=0.3))
        draws = _kd_draws(cfg, seed * 1_000_033 + k, n, len(alphas_cumprod), cache["mean"].shape[1:])
        opt.zero_grad(set_to_none=True)
        metrics = d.accumulate([student_m], d.micro(draws, par.grad_accum), loss_fn, dev, par.precision)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        return metrics

    try:
        run_loop(
            "unet-kd",
            out,
            LoopConfig(cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, max_seconds=cfg.max_seconds),
            step,
            {"unet": student},
            {"opt": opt},
            d=d,
        )
    finally:
        tap_s.remove()
        tap_t.remove()
    return dist.released(student).eval()
