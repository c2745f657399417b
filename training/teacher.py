"""SHAPES-64 teacher: a KL VAE, then a CLIP text encoder + SD-2.1-topology U-Net, from scratch.

Stages (each resumable under `out/<stage>/`):
  vae     AutoencoderKL on rendered images. Shapes cover ~5% of the pixels, and a VAE trained on a plain
          image loss learns to reproduce the background alone (ANCHORS.md), so the reconstruction loss
          weights shape pixels (known exactly from the renderer) by `fg_weight`.
  latents encode a fixed cache of training images once; the latent scaling factor is measured on it.
  unet    epsilon-prediction denoising loss (scaled-linear betas, 1000 steps) with the text encoder trained
          jointly and captions dropped to "" with probability `cfg_dropout` for classifier-free guidance.
The result is a diffusers StableDiffusionPipeline folder (`out/model`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sdxs_edge import shapes
from sdxs_edge.atomic import atomic_file, write_atomic
from sdxs_edge.presets import get_preset
from training import dist
from training.dist import DistInfo
from training.loop import LoopConfig, run_loop


@dataclass(frozen=True)
class TeacherConfig:
    """SHAPES-64 teacher recipe.

    Args:
        preset: architecture preset (shapes-teacher, or tiny-teacher for tests).
        vae_steps: VAE optimizer steps.
        vae_batch: VAE batch size.
        vae_lr: VAE Adam learning rate.
        fg_weight: extra loss weight on shape pixels (see module docstring).
        kl_weight: KL weight of the VAE posterior (small, as in SD's VAE).
        cache_size: training images encoded once into the latent cache.
        unet_steps: U-Net + text encoder optimizer steps.
        unet_batch: U-Net batch size.
        unet_lr: AdamW learning rate (after linear warm-up, cosine to 10%).
        warmup: warm-up steps of the U-Net learning rate.
        cfg_dropout: probability of replacing a caption with "" (classifier-free guidance).
        seed: data and init seed.
        threads: torch CPU threads.
        emphasis_from: U-Net step from which the two settings below apply (phase 2 of the recipe).
        high_t_share: share of each U-Net batch drawn from t >= T/2 instead of uniformly. Layout (where
            the shape goes) is decided at high noise, where the epsilon loss barely sees x0: with the
            plain loss the teacher drew the right shape and colour at a random position.
        snr_weight_cap: weight each sample's epsilon loss by min(1/SNR(t), cap), i.e. towards an x0 loss
            at high noise (0 disables; the plain DDPM loss).
        grad_accum: micro-batches per optimizer step (the batch sizes above are global, per step).
        log_every: steps between log lines.
        vae_ckpt_every: VAE steps between checkpoints (a killed run resumes from the last one).
        unet_ckpt_every: U-Net steps between checkpoints.
    """

    preset: str = "shapes-teacher"
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    fg_weight: float = 12.0
    kl_weight: float = 1e-6
    cache_size: int = 40960
    unet_steps: int = 4500
    unet_batch: int = 64
    unet_lr: float = 6e-4
    warmup: int = 200
    cfg_dropout: float = 0.1
    seed: int = 0
    threads: int = 2
    emphasis_from: int = 3000
    high_t_share: float = 0.5
    snr_weight_cap: float = 5.0
    grad_accum: int = 1
    log_every: int = 25
    vae_ckpt_every: int = 250
    unet_ckpt_every: int = 500


SMOKE = dict(
    preset="tiny-teacher",
    vae_steps=6,
    vae_batch=8,
    cache_size=64,
    unet_steps=6,
    unet_batch=8,
    warmup=2,
    emphasis_from=3,
    log_every=1,
    threads=1,
    vae_ckpt_every=2,
    unet_ckpt_every=2,
)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return f


class VAERecon(torch.nn.Module):
    """encode -> reparameterised sample -> decode in one forward, so DDP sees (and syncs) the whole pass."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = self.vae.encode(images).latent_dist
        return self.vae.decode(post.mean + post.std * noise).sample, post.kl()


def vae_loss(
    recon: torch.nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    fg_weight: float,
    kl_weight: float,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, dict]:
    """Shape-weighted L1 + MSE reconstruction + KL. masks: (B, H, W) shape coverage in [0, 1].

    `noise` is the posterior sample's unit noise, drawn by the caller so data-parallel shards match."""
    rec, kl = recon(images, noise)
    w = (1.0 + fg_weight * F.max_pool2d(masks[:, None], 3, stride=1, padding=1)).expand_as(images)
    err = rec - images
    # Normalised per sample, so the batch mean splits exactly across data-parallel shards.
    norm = w.flatten(1).sum(1)
    l1 = ((w * err.abs()).flatten(1).sum(1) / norm).mean()
    l2 = ((w * err.square()).flatten(1).sum(1) / norm).mean()
    kl = kl.mean() / images[0].numel()
    return l1 + l2 + kl_weight * kl, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


@torch.no_grad()
def vae_report(vae, n: int = 256, seed: int = 1) -> dict:
    """PSNR on whole images and on shape pixels only, on held-out evaluation scenes."""
    b = shapes.make_batch(shapes.eval_scenes(n, seed))
    x = torch.from_numpy(shapes.to_tensor_range(b.images))
    rec = torch.cat([vae.decode(vae.encode(x[i : i + 64]).latent_dist.mode()).sample for i in range(0, n, 64)]).clamp(
        -1, 1
    )
    err = ((rec - x) / 2).square()  # in [0,1] units
    m = torch.from_numpy(b.masks > 0.5)[:, None].expand_as(err)
    return {
        "psnr": float(-10 * torch.log10(err.mean())),
        "psnr_shape": float(-10 * torch.log10(err[m].mean())),
    }


def _micro(cfg: TeacherConfig, d: DistInfo, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """This rank's shard of a global batch, split into `grad_accum` micro-batches."""
    return d.micro(tensors, cfg.grad_accum)


def train_vae(cfg: TeacherConfig, out: Path):
    from sdxs_edge.models import build_vae

    d, dev = dist.init(), dist.device()
    torch.manual_seed(cfg.seed)
    vae = build_vae(get_preset(cfg.preset)).to(dev).train()
    model = d.wrap(VAERecon(vae))
    opt = torch.optim.Adam(vae.parameters(), cfg.vae_lr)
    lr_f = _lr_lambda(min(50, cfg.vae_steps // 4 + 1), cfg.vae_steps)

    def step(k: int) -> dict:
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * lr_f(k)
        b = next(shapes.train_stream(cfg.vae_batch, seed=cfg.seed, start=k))
        x = torch.from_numpy(shapes.to_tensor_range(b.images))
        noise = torch.randn(
            (x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8), generator=torch.Generator().manual_seed(cfg.seed * 7 + k)
        )
        opt.zero_grad(set_to_none=True)
        micro = _micro(cfg, d, [x, torch.from_numpy(b.masks), noise])
        total, parts = 0.0, {}
        for i, (xm, mm, nm) in enumerate(micro):
            with d.no_sync(model, i == len(micro) - 1), dist.autocast(dev):
                loss, parts = vae_loss(model, xm.to(dev), mm.to(dev), cfg.fg_weight, cfg.kl_weight, nm.to(dev))
                (loss / len(micro)).backward()
            total += loss.item() / len(micro)
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return {"loss": d.mean(total), **parts}

    run_loop(
        "vae",
        out / "vae",
        LoopConfig(cfg.vae_steps, log_every=cfg.log_every, ckpt_every=cfg.vae_ckpt_every),
        step,
        {"vae": vae},
        {"opt": opt},
        d=d,
    )
    return vae.cpu().eval()


@torch.no_grad()
def build_latent_cache(cfg: TeacherConfig, vae, tokenizer, path: Path) -> dict:
    """Encode `cache_size` training images once: posterior mean and std, token ids, labels."""
    if path.is_file():
        return load_file(str(path))
    means, stds, ids = [], [], []
    gen = shapes.train_stream(256, seed=cfg.seed + 1000)
    from tqdm.auto import tqdm

    for _ in tqdm(range(math.ceil(cfg.cache_size / 256)), desc="latents"):
        b = next(gen)
        post = vae.encode(torch.from_numpy(shapes.to_tensor_range(b.images)).to(vae.device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
        ids.append(
            tokenizer(b.captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        )
    cache = {
        "mean": torch.cat(means)[: cfg.cache_size].contiguous(),
        "std": torch.cat(stds)[: cfg.cache_size].contiguous(),
        "ids": torch.cat(ids)[: cfg.cache_size].int().contiguous(),
    }
    # SD's convention: scale latents to unit variance (the "scaling_factor" in the VAE config).
    cache["scaling_factor"] = torch.tensor(1.0 / cache["mean"].std().item())
    with atomic_file(path) as tmp:  # data-parallel ranks write identical caches, each through its own temporary
        save_file(cache, str(tmp))
    return cache


def train_unet(cfg: TeacherConfig, out: Path, text_encoder, unet, tokenizer, cache: dict) -> None:
    from diffusers import DDPMScheduler

    preset = get_preset(cfg.preset)
    noise_sched = DDPMScheduler(**{k: v for k, v in preset.scheduler.items() if k != "timestep_spacing"})
    acp = noise_sched.alphas_cumprod
    scale = float(cache["scaling_factor"])
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, cfg.unet_lr, weight_decay=0.01)
    lr_f = _lr_lambda(cfg.warmup, cfg.unet_steps)
    d, dev = dist.init(), dist.device()
    unet.to(dev).train()
    text_encoder.to(dev).train()
    unet_m, te_m = d.wrap(unet), d.wrap(text_encoder)
    n = cache["mean"].shape[0]

    def step(k: int) -> dict:
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * lr_f(k)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=g)
        z0 = (cache["mean"][idx] + cache["std"][idx] * torch.randn(cache["mean"][idx].shape, generator=g)) * scale
        ids = cache["ids"][idx].long()
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.cfg_dropout
        ids[drop] = empty
        T = acp.numel()
        t = torch.randint(0, T, (cfg.unet_batch,), generator=g)
        phase2 = k >= cfg.emphasis_from
        high = torch.rand(cfg.unet_batch, generator=g) < (cfg.high_t_share if phase2 else 0.0)
        t = torch.where(high, torch.randint(T // 2, T, (cfg.unet_batch,), generator=g), t)
        eps = torch.randn(z0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        w = (
            ((1 - acp[t]) / acp[t]).clamp(max=cfg.snr_weight_cap)
            if (phase2 and cfg.snr_weight_cap > 0)
            else torch.ones(cfg.unet_batch)
        )
        w = w / w.mean()
        opt.zero_grad(set_to_none=True)
        micro = _micro(cfg, d, [zt, t, ids, eps, w])
        total = 0.0
        for i, (zm, tm, im, em, wm) in enumerate(micro):
            last = i == len(micro) - 1
            with d.no_sync(unet_m, last), d.no_sync(te_m, last), dist.autocast(dev):
                pred = unet_m(zm.to(dev), tm.to(dev), te_m(im.to(dev))[0]).sample.float()
                loss = (wm.to(dev) * (pred - em.to(dev)).square().flatten(1).mean(1)).mean()
                (loss / len(micro)).backward()
            total += loss.item() / len(micro)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return {"loss": d.mean(total), "lr": opt.param_groups[0]["lr"]}

    run_loop(
        "unet",
        out / "unet",
        LoopConfig(cfg.unet_steps, log_every=cfg.log_every, ckpt_every=cfg.unet_ckpt_every),
        step,
        {"unet": unet, "text_encoder": text_encoder},
        {"opt": opt},
        d=d,
    )
    unet.cpu().eval()
    text_encoder.cpu().eval()


def train_teacher(cfg: TeacherConfig, out: str | Path) -> Path:
    """Run all stages (resuming each) and write the diffusers folder `out/model`. Returns its path."""
    import time

    from sdxs_edge.models import Components, build_text_encoder, build_unet
    from sdxs_edge.pipeline import SDXSPipeline
    from sdxs_edge.tokenizer import load_clip_tokenizer, write_clip_tokenizer

    torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(asdict(cfg), indent=2))
    preset = get_preset(cfg.preset)
    times = {}
    t = time.time()
    vae = train_vae(cfg, out)
    vae_metrics = vae_report(vae, n=64 if cfg.cache_size < 1000 else 256)
    times["vae"] = time.time() - t
    print(
        f"[vae] held-out PSNR {vae_metrics['psnr']:.2f} dB, on shape pixels {vae_metrics['psnr_shape']:.2f} dB",
        flush=True,
    )
    tokenizer = load_clip_tokenizer(write_clip_tokenizer(out / "tokenizer", pad_token=preset.pad_token))
    t = time.time()
    cache = build_latent_cache(cfg, vae, tokenizer, out / "latents.safetensors")
    times["latents"] = time.time() - t
    vae.register_to_config(scaling_factor=float(cache["scaling_factor"]))
    torch.manual_seed(cfg.seed)
    text_encoder, unet = build_text_encoder(preset), build_unet(preset)
    t = time.time()
    train_unet(cfg, out, text_encoder, unet, tokenizer, cache)
    times["unet"] = time.time() - t
    d = dist.init()
    if not d.is_main:
        torch.distributed.barrier()  # wait for rank 0 to write the model
        return out / "model"
    pipe = SDXSPipeline(
        Components(tokenizer, text_encoder, unet, vae, dict(preset.scheduler)), name=f"{cfg.preset} trained"
    )
    pipe.default_steps, pipe.default_guidance = preset.default_steps, preset.default_guidance
    model = pipe.save_pretrained(out / "model", overwrite=True)
    report = {
        "vae": vae_metrics,
        "scaling_factor": float(cache["scaling_factor"]),
        "seconds": times,
        "config": asdict(cfg),
    }
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    if d.world > 1:
        torch.distributed.barrier()
    return model


def smoke_config(**over) -> TeacherConfig:
    return replace(TeacherConfig(**SMOKE), **over)
