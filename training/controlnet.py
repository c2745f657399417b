"""ControlNet distillation (arXiv 2403.16627 Sec. 3.4, "Image-conditioned control"): a canny-edge ControlNet
for the SHAPES-64 teacher, then a student ControlNet for the frozen one-step U-Net.

Stages (each resumes from its own folder under `out/`):
  teacher-controlnet  `controlnet_for_unet(teacher U-Net)`, teacher U-Net / VAE / text encoder frozen;
                      renders -> VAE latents (x scaling_factor), control = canny(render); the DDPM epsilon
                      loss through U-Net + ControlNet residuals, captions dropped to "" 10% of the time.
  triplets            (noise, x0, control) from the teacher's own samples (25 Euler steps, guidance): the
                      control is canny(decode(x0)), not a data-set render, so the three agree (Sec. 3.4).
  controlnet          a ControlNet for the frozen one-step U-Net, trained with output KD (one-step x0 vs the
                      triplet's x0) + lambda_F x feature KD on the U-Net decoder blocks against the offline DM
                      (teacher U-Net + teacher ControlNet, frozen, a feature extractor only). `fresh_noise`
                      replaces the noise input of part of the batch, so the layout must come from the control.
  report              edge fidelity (IoU of control edges and the generated image's edges) and the
                      all-correct rate, with and without ControlNets; a PNG grid.

    sdxs-edge train controlnet                # CPU recipe, about 40 minutes on one core
    sdxs-edge train controlnet --smoke        # tiny random models, seconds (tests)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdxs_edge import sampler, shapes
from sdxs_edge.atomic import atomic_file, write_atomic
from sdxs_edge.control import canny, edge_iou, edges_to_control
from sdxs_edge.errors import SDXSError
from training.loop import LoopConfig, Progress, StageClock, cosine_lr, run_loop, set_lr

REPO = Path(__file__).resolve().parent.parent
STAGES = ("teacher-controlnet", "triplets", "controlnet", "report")
TRIPLET_SEED = 4244  # EVAL-stream seed of the triplet prompts: not an evaluation seed, nor the chain's 4242/4243
MISMATCH_SEED = 4245  # EVAL-stream seed of the scenes whose teacher samples give the report's "other scene" controls


# ---- configuration ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherCNConfig:
    """Args:
    steps: optimizer steps.
    batch: images per step.
    lr: AdamW peak learning rate (warm-up, then cosine to 10%).
    warmup: warm-up steps.
    cache_size: renders encoded once (latent mean/std, canny edges, token ids).
    cfg_dropout: share of captions replaced by "". ControlNet's recipe drops half (Zhang et al. 2023): a SHAPES-64
        caption already fixes shape and position, so with a caption the edges add only jitter and radius;
        without one the edges carry the whole layout.
    high_t_share: share of the batch drawn from t >= T/2: layout is decided at high noise (as the teacher's phase 2).
    snr_weight_cap: per-sample weight min(1/SNR(t), cap), towards an x0 loss at high noise (0 = plain DDPM loss).
    max_seconds: wall-clock budget (the loop checkpoints and stops when it is spent); None = none.
    ckpt_every: steps between checkpoints (a killed run resumes from the last one).
    log_every: steps between log lines.
    """

    steps: int = 3000
    batch: int = 32
    lr: float = 4e-4
    warmup: int = 100
    cache_size: int = 8192
    cfg_dropout: float = 0.5
    high_t_share: float = 0.5
    snr_weight_cap: float = 5.0
    max_seconds: float | None = None
    ckpt_every: int = 250
    log_every: int = 25


@dataclass(frozen=True)
class TripletConfig:
    """Args:
    n: number of (noise, x0, control) triplets.
    steps: teacher Euler steps per sample.
    guidance: classifier-free guidance of the teacher samples (2.5, as the chain's ODE pairs).
    with_controlnet: sample with the teacher ControlNet fed canny(render of the prompt's scene) (else plain teacher).
    batch: samples per teacher batch.
    """

    n: int = 2048
    steps: int = 25
    guidance: float = 2.5
    with_controlnet: bool = False
    batch: int = 64


@dataclass(frozen=True)
class StudentCNConfig:
    """Args:
    steps: optimizer steps.
    batch: triplets per step.
    lr: AdamW peak learning rate (warm-up, then cosine to 10%).
    warmup: warm-up steps.
    feature_weight: lambda_F, weight of the feature-KD term on the U-Net decoder blocks. Small: the
        teacher U-Net predicts epsilon and a v-prediction student's decoder features differ from it in
        kind (at 0.1 the term started 45x the output KD and the student ControlNet cost 15 points of
        all-correct on consistent controls).
    fresh_noise: share of each batch whose noise input is replaced by fresh noise (target and control kept).
    max_seconds: wall-clock budget (the loop checkpoints and stops when it is spent); None = none.
    ckpt_every: steps between checkpoints (a killed run resumes from the last one).
    log_every: steps between log lines.
    """

    steps: int = 2500
    batch: int = 32
    lr: float = 2e-4
    warmup: int = 100
    feature_weight: float = 0.01
    fresh_noise: float = 0.5
    max_seconds: float | None = None
    ckpt_every: int = 250
    log_every: int = 25


@dataclass(frozen=True)
class ReportConfig:
    """Args:
    n: evaluation prompts per control set.
    steps: teacher sampling steps.
    guidance: teacher guidance.
    grid: prompts in the PNG grid.
    batch: images per generation batch.
    latency_runs: timed single-image runs per model (median reported).
    """

    n: int = 256
    steps: int = 25
    guidance: float = 2.5
    grid: int = 8
    batch: int = 64
    latency_runs: int = 5


@dataclass(frozen=True)
class ControlNetRunConfig:
    """Args:
    teacher: teacher model folder or preset ("tiny-teacher" for smoke runs).
    student: one-step student folder, or "block-removed" (the teacher's block-removed U-Net, random-free init; smoke).
    teacher_cn, triplets, student_cn, report: stage recipes.
    threads: torch CPU threads.
    seed: init and data seed.
    """

    teacher: str = str(REPO / "models" / "shapes-teacher")
    student: str = str(REPO / "sdxs_edge" / "default_model")
    teacher_cn: TeacherCNConfig = field(default_factory=TeacherCNConfig)
    triplets: TripletConfig = field(default_factory=TripletConfig)
    student_cn: StudentCNConfig = field(default_factory=StudentCNConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    threads: int = 1
    seed: int = 0


PRESETS = {
    # One CPU thread, about an hour: each training stage is wall-clock capped (its schedule completes).
    "cpu": ControlNetRunConfig(
        teacher_cn=TeacherCNConfig(max_seconds=840),
        triplets=TripletConfig(n=1536),
        student_cn=StudentCNConfig(max_seconds=780),
    ),
    "smoke": ControlNetRunConfig(
        teacher="tiny-teacher",
        student="block-removed",
        teacher_cn=TeacherCNConfig(steps=4, batch=4, warmup=2, cache_size=16, ckpt_every=2, log_every=1),
        triplets=TripletConfig(n=8, steps=2, batch=4),
        student_cn=StudentCNConfig(steps=4, batch=4, warmup=2, ckpt_every=2, log_every=1),
        report=ReportConfig(n=8, steps=2, grid=4, batch=8, latency_runs=1),
    ),
}


def get_config(name: str, **over) -> ControlNetRunConfig:
    """A preset ("cpu" or "smoke") with top-level fields replaced by `over` (None values ignored)."""
    if name not in PRESETS:
        raise SDXSError(f"unknown controlnet recipe {name!r}; recipes: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in over.items() if v is not None})


# ---- helpers ----------------------------------------------------------------------------------------------
def _acp(pipe) -> torch.Tensor:
    return torch.from_numpy(sampler.alphas_cumprod(pipe.c.scheduler_config))


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().astype(np.uint8)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, text)


def residuals(controlnet, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, control: torch.Tensor) -> dict:
    """The ControlNet's skip residuals, as U-Net keyword arguments."""
    down, mid = controlnet(x, t, ctx, control, return_dict=False)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def load_student(spec: str, teacher):
    """The one-step student pipeline: a folder, or "block-removed" (the teacher's block-removed U-Net with
    the teacher's other components; smoke runs)."""
    from sdxs_edge.models import Components
    from sdxs_edge.pipeline import SDXSPipeline

    if spec == "block-removed":
        from training.unet_kd import build_student

        unet, _ = build_student(teacher.c.unet)
        c = teacher.c
        pipe = SDXSPipeline(
            Components(c.tokenizer, c.text_encoder, unet.eval(), c.vae, dict(c.scheduler_config)),
            name="block-removed teacher (smoke)",
        )
        return pipe
    pipe = SDXSPipeline.load(spec)
    pipe.default_steps, pipe.default_guidance = 1, 0.0
    return pipe


def feature_pairs(student_unet, teacher_unet) -> dict[str, str]:
    """Student -> teacher U-Net decoder blocks compared by feature KD: the up-block entries of the SDXS layer
    map (`SDXS_FEATURE_PAIRS`, data), checked to exist on both U-Nets."""
    from sdxs_edge.presets import SDXS_FEATURE_PAIRS

    s_mods, t_mods = dict(student_unet.named_modules()), dict(teacher_unet.named_modules())
    pairs = {s: t for s, t in SDXS_FEATURE_PAIRS.items() if s.startswith("up_blocks.")}
    for s, t in pairs.items():
        if s not in s_mods or t not in t_mods:
            raise SDXSError(
                f"feature pair {s} -> {t} does not exist on these U-Nets (student up blocks: {len(student_unet.up_blocks)}, teacher: {len(teacher_unet.up_blocks)})"
            )
    return pairs


# ---- stage 1: teacher ControlNet ---------------------------------------------------------------------------
def wake_conditioning(controlnet, control: torch.Tensor, target_std: float = 0.5, seed: int = 0):
    """Re-initialise the control-image encoder (`controlnet_cond_embedding`) with He-normal convolutions,
    its last one included and rescaled so that on `control` (a batch of control images) its output has
    standard deviation `target_std` (about that of the latent's conv_in features), in place; returns `controlnet`.

    diffusers zero-initialises the encoder's last conv and PyTorch's default conv init shrinks a signal at each
    of its 8 layers: a sparse edge map reached the ControlNet's features at ~1e-5 of their scale, the residuals
    did not depend on the control at all, and 750 training steps learnt nothing (a sparse edge map still comes out
    small after He init, hence the data-dependent scale). The ControlNet's output zero
    convolutions stay zero, so the U-Net's output is still unchanged at initialisation.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in controlnet.controlnet_cond_embedding.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.zero_()
        emb = controlnet.controlnet_cond_embedding
        emb.conv_out.weight.mul_(target_std / emb(control.float()).std().clamp_min(1e-8))
    return controlnet


@torch.no_grad()
def build_control_cache(teacher, n: int, path: Path, seed: int = 0) -> dict:
    """Encode `n` training renders once: VAE posterior mean/std, canny edges (uint8), token ids."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    if path.is_file():
        return load_file(str(path))
    means, stds, edges, ids = [], [], [], []
    bs = min(256, n)
    gen = shapes.train_stream(bs, seed=seed + 2000)
    for _ in tqdm(range((n + bs - 1) // bs), desc="control cache"):
        b = next(gen)
        post = teacher.c.vae.encode(torch.from_numpy(shapes.to_tensor_range(b.images))).latent_dist
        means.append(post.mean)
        stds.append(post.std)
        edges.append(torch.from_numpy(canny(b.images)))
        ids.append(teacher.tokenize(b.captions).int())
    cache = {k: torch.cat(v)[:n] for k, v in (("mean", means), ("std", stds), ("edges", edges), ("ids", ids))}
    _save_tensors(cache, path)
    return cache


def train_teacher_controlnet(cfg: TeacherCNConfig, out: Path, teacher, controlnet, cache: dict, seed: int = 0):
    """DDPM epsilon loss through the frozen teacher U-Net + the trainable ControlNet's residuals."""
    unet, te = teacher.c.unet.requires_grad_(False).eval(), teacher.c.text_encoder.requires_grad_(False).eval()
    controlnet.train()
    acp = _acp(teacher)
    T = len(acp)
    scale = teacher.latent_scaling
    empty = teacher.tokenize([""])[0].int()
    opt = torch.optim.AdamW(controlnet.parameters(), cfg.lr, weight_decay=0.0)
    progress = Progress(cfg.steps, cfg.max_seconds)
    n = cache["mean"].shape[0]

    def step(k: int) -> dict:
        set_lr(opt, cosine_lr(cfg.lr, k, progress(k), warm=cfg.warmup))
        g = torch.Generator().manual_seed(seed * 1_000_081 + k)
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        z0 = (cache["mean"][idx] + cache["std"][idx] * torch.randn(cache["mean"][idx].shape, generator=g)) * scale
        ids = cache["ids"][idx].clone()
        ids[torch.rand(cfg.batch, generator=g) < cfg.cfg_dropout] = empty
        control = torch.from_numpy(edges_to_control(cache["edges"][idx].numpy()))
        t = torch.randint(0, T, (cfg.batch,), generator=g)
        high = torch.rand(cfg.batch, generator=g) < cfg.high_t_share
        t = torch.where(high, torch.randint(T // 2, T, (cfg.batch,), generator=g), t)
        eps = torch.randn(z0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        w = ((1 - acp[t]) / acp[t]).clamp(max=cfg.snr_weight_cap) if cfg.snr_weight_cap > 0 else torch.ones(cfg.batch)
        w = w / w.mean()
        with torch.no_grad():
            ctx = te(ids.long())[0]
        pred = unet(zt, t, ctx, **residuals(controlnet, zt, t, ctx, control)).sample
        loss = (w * (pred - eps).square().flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item(), "lr": opt.param_groups[0]["lr"]}

    result = run_loop(
        "teacher-controlnet",
        out,
        LoopConfig(cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, max_seconds=cfg.max_seconds),
        step,
        {"controlnet": controlnet},
        {"opt": opt},
    )
    return controlnet.eval(), result


# ---- stage 2: triplets --------------------------------------------------------------------------------------
@torch.no_grad()
def make_triplets(cfg: TripletConfig, teacher, student, teacher_cn=None, seed: int = 1) -> dict[str, torch.Tensor]:
    """(noise, x0, canny edges of decode(x0)) from the teacher's own samples, with both models' token ids.

    Args:
        cfg: triplet settings.
        teacher: teacher pipeline (its sampler and VAE make x0 and the control).
        student: student pipeline (for its token ids).
        teacher_cn: the teacher ControlNet, used when `cfg.with_controlnet`.
        seed: noise seed.
    """
    from tqdm.auto import tqdm

    scenes = shapes.eval_scenes(cfg.n, seed=TRIPLET_SEED)
    caps = [s.caption for s in scenes]
    teacher.attach_controlnet(teacher_cn if cfg.with_controlnet else None)
    out: dict[str, list] = {"noise": [], "x0": [], "edges": [], "ids_teacher": [], "ids_student": []}
    try:
        for i in tqdm(range(0, cfg.n, cfg.batch), desc="triplets"):
            p = caps[i : i + cfg.batch]
            noise = teacher.noise(len(p), seed * 1_000_003 + i)
            ctrl = None
            if cfg.with_controlnet:
                ctrl = torch.from_numpy(edges_to_control(canny(shapes.make_batch(scenes[i : i + cfg.batch]).images)))
            gen = teacher.generate(
                p, steps=cfg.steps, guidance=cfg.guidance, noise=noise, output="tensor", control_image=ctrl
            )
            out["noise"].append(noise)
            out["x0"].append(gen.latents.cpu())
            out["edges"].append(torch.from_numpy(canny(_to_uint8(gen.images))))
            out["ids_teacher"].append(teacher.tokenize(p).int())
            out["ids_student"].append(student.tokenize(p).int())
    finally:
        teacher.attach_controlnet(None)
    return {k: torch.cat(v) for k, v in out.items()}


# ---- stage 3: student ControlNet ------------------------------------------------------------------------------
class ControlNetKDLoss:
    """Output KD + lambda_F x feature KD for a student ControlNet on a frozen one-step U-Net (Sec. 3.4).

    Output KD: || x0_student(noise', control) - x0_triplet ||^2, x0_student the SDXS one-step rule at t = T-1
    with U-Net + student-ControlNet residuals, noise' the triplet's noise or (a `fresh_noise` share) fresh noise.
    Feature KD: sum over matched decoder blocks of || f_student - f_offline ||^2, the offline DM (teacher U-Net +
    teacher ControlNet, frozen) run on the same input, timestep, prompt and control.
    """

    def __init__(self, student, s_cn, teacher, t_cn, feature_weight: float, fresh_noise: float):
        from training.unet_kd import FeatureTap

        self.s_unet, self.s_te, self.s_cn = (
            student.c.unet.requires_grad_(False).eval(),
            student.c.text_encoder.requires_grad_(False).eval(),
            s_cn,
        )
        self.t_unet, self.t_te, self.t_cn = (
            teacher.c.unet.requires_grad_(False).eval(),
            teacher.c.text_encoder.requires_grad_(False).eval(),
            t_cn.requires_grad_(False).eval(),
        )
        self.consts = student.one_step_constants()
        self.feature_weight, self.fresh_noise = feature_weight, fresh_noise
        self.pairs = feature_pairs(self.s_unet, self.t_unet) if feature_weight > 0 else {}
        self.tap_s = FeatureTap(self.s_unet, self.pairs.keys())
        self.tap_t = FeatureTap(self.t_unet, self.pairs.values())

    def close(self) -> None:
        self.tap_s.remove()
        self.tap_t.remove()

    def __call__(self, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        noise, x0 = batch["noise"], batch["x0"]
        b = noise.shape[0]
        fresh = (torch.rand(b, generator=g) < self.fresh_noise).view(-1, 1, 1, 1)
        noise = torch.where(fresh, torch.randn(noise.shape, generator=g), noise)
        control = torch.from_numpy(edges_to_control(batch["edges"].numpy()))
        c = self.consts
        x_in = sampler.initial_latent(noise, c)
        t = torch.full((b,), c.timestep)
        with torch.no_grad():
            ctx_s = self.s_te(batch["ids_student"].long())[0]
        eps = self.s_unet(x_in, t, ctx_s, **residuals(self.s_cn, x_in, t, ctx_s, control)).sample
        pred = sampler.denoised(eps, noise, c)
        out_kd = F.mse_loss(pred, x0)
        feat_kd = torch.zeros(())
        if self.pairs:
            with torch.no_grad():
                ctx_t = self.t_te(batch["ids_teacher"].long())[0]
                self.t_unet(x_in, t, ctx_t, **residuals(self.t_cn, x_in, t, ctx_t, control))
            feat_kd = sum(F.mse_loss(self.tap_s.out[s], self.tap_t.out[t_]) for s, t_ in self.pairs.items())
        loss = out_kd + self.feature_weight * feat_kd
        return loss, {"loss": loss.item(), "out_kd": out_kd.item(), "feat_kd": float(feat_kd.detach())}


def train_student_controlnet(
    cfg: StudentCNConfig, out: Path, student, s_cn, teacher, t_cn, triplets: dict, seed: int = 0
):
    """Train `s_cn` for the frozen one-step U-Net on the triplets (see `ControlNetKDLoss`)."""
    s_cn.train()
    loss_fn = ControlNetKDLoss(student, s_cn, teacher, t_cn, cfg.feature_weight, cfg.fresh_noise)
    opt = torch.optim.AdamW(s_cn.parameters(), cfg.lr, weight_decay=0.0)
    progress = Progress(cfg.steps, cfg.max_seconds)
    n = triplets["noise"].shape[0]

    def step(k: int) -> dict:
        set_lr(opt, cosine_lr(cfg.lr, k, progress(k), warm=cfg.warmup))
        g = torch.Generator().manual_seed(seed * 1_000_099 + k)
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        loss, logs = loss_fn({k_: v[idx] for k_, v in triplets.items()}, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s_cn.parameters(), 1.0)
        opt.step()
        return logs

    try:
        result = run_loop(
            "controlnet",
            out,
            LoopConfig(cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, max_seconds=cfg.max_seconds),
            step,
            {"controlnet": s_cn},
            {"opt": opt},
        )
    finally:
        loss_fn.close()
    return s_cn.eval(), result


# ---- stage 4: report --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_images(
    pipe, prompts: list[str], control: np.ndarray | None, steps: int, guidance: float, batch: int, seed: int = 0
) -> np.ndarray:
    """uint8 images for `prompts`, with `control` (float (B, 3, H, W)) through the attached ControlNet, or none."""
    out = []
    for i in range(0, len(prompts), batch):
        p = prompts[i : i + batch]
        noise = pipe.noise(len(p), seed * 100_003 + i)
        ctrl = None if control is None else torch.from_numpy(control[i : i + batch])
        img = pipe.generate(p, steps=steps, guidance=guidance, noise=noise, output="tensor", control_image=ctrl).images
        out.append(_to_uint8(img))
    return np.concatenate(out)


def _latency(pipe, control: np.ndarray | None, steps: int, guidance: float, runs: int) -> float:
    prompt = "a large cyan triangle at the bottom left on a black background"
    ctrl = None if control is None else torch.from_numpy(control[:1])
    pipe.generate(prompt, steps=steps, guidance=guidance, control_image=ctrl)
    ts = []
    for i in range(runs):
        t = time.perf_counter()
        pipe.generate(prompt, seed=i, steps=steps, guidance=guidance, control_image=ctrl)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def _row_grid(columns: list[np.ndarray], path: Path) -> Path:
    """One row per prompt, one column per image set (uint8 (B, H, W, 3) each), 2 px grey gutters."""
    from PIL import Image

    n, h, w = columns[0].shape[:3]
    grid = np.full((n * (h + 2), len(columns) * (w + 2), 3), 128, np.uint8)
    for c, imgs in enumerate(columns):
        for r in range(n):
            grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = imgs[r]
    with atomic_file(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path


def _report_row(
    cfg: ReportConfig, ev, ref, sets: dict, pipe, cn, steps: int, guidance: float
) -> tuple[dict, np.ndarray]:
    """One model of `controlnet_report`: its figures on each control set, and its other-scene grid column."""
    from sdxs_edge.evaluate import accuracy_report
    from sdxs_edge.models import count_parameters

    prompts = ref.captions
    pipe.attach_controlnet(cn)
    r: dict = {
        "steps": steps,
        "guidance": guidance,
        "unet_params": count_parameters(pipe.c.unet),
        "controlnet_params": count_parameters(cn) if cn is not None else 0,
    }
    try:
        for set_name, edges in sets.items():
            control = edges_to_control(edges)
            imgs = generate_images(pipe, prompts, control if cn is not None else None, steps, guidance, cfg.batch)
            iou = edge_iou(edges, canny(imgs))
            acc = accuracy_report(ev.classify(imgs), ref.labels)
            r[set_name] = {
                "edge_iou": float(iou.mean()),
                "all_correct": acc["all_correct"],
                **{a: acc[a] for a in shapes.ATTRIBUTES},
            }
            if set_name == "other-scene":
                column = imgs[: cfg.grid]
        r["cpu_latency_s"] = _latency(
            pipe,
            edges_to_control(sets["consistent"][:1]) if cn is not None else None,
            steps,
            guidance,
            cfg.latency_runs,
        )
    finally:
        pipe.attach_controlnet(None)
    return r, column


def controlnet_report(cfg: ReportConfig, teacher, t_cn, student, s_cn, out: Path) -> dict:
    """Edge IoU and all-correct rate of four models on two control sets; parameter counts; CPU latency; grid.

    Control sets, for the same `cfg.n` evaluation prompts (EVAL stream seed 0):
      consistent: canny of the render of each prompt's own scene (control and prompt agree; the main table);
      other-scene: canny of teacher samples of *other* prompts (EVAL seed 4245), so the control asks for
        another position / shape than the prompt: IoU shows whether the control moves the shape; all-correct
        is still judged against the prompt, which the control contradicts.
    """
    from sdxs_edge.evaluate import Evaluator

    ev = Evaluator.load()
    scenes = shapes.eval_scenes(cfg.n, seed=0)
    ref = shapes.make_batch(scenes)
    prompts = ref.captions
    edges_consistent = canny(ref.images)
    teacher.attach_controlnet(None)
    other_caps = [s.caption for s in shapes.eval_scenes(cfg.n, seed=MISMATCH_SEED)]
    other_imgs = generate_images(teacher, other_caps, None, cfg.steps, cfg.guidance, cfg.batch, seed=7)
    edges_other = canny(other_imgs)
    sets = {"consistent": edges_consistent, "other-scene": edges_other}
    rows = [
        ("teacher, no ControlNet", teacher, None, cfg.steps, cfg.guidance),
        ("teacher + teacher ControlNet", teacher, t_cn, cfg.steps, cfg.guidance),
        ("one-step, no ControlNet", student, None, 1, 0.0),
        ("one-step + student ControlNet", student, s_cn, 1, 0.0),
    ]
    rep: dict = {"n": cfg.n, "teacher_steps": cfg.steps, "teacher_guidance": cfg.guidance, "models": {}}
    grid_cols = {}
    for name, pipe, cn, steps, guidance in rows:
        rep["models"][name], grid_cols[name] = _report_row(cfg, ev, ref, sets, pipe, cn, steps, guidance)
    ctrl_img = np.repeat(edges_other[: cfg.grid, :, :, None], 3, axis=3)
    _row_grid(
        [
            ctrl_img,
            grid_cols["teacher + teacher ControlNet"],
            grid_cols["one-step + student ControlNet"],
            grid_cols["one-step, no ControlNet"],
        ],
        out / "grid.png",
    )
    rep["grid"] = {
        "file": "grid.png",
        "columns": [
            "control (canny of another scene's teacher sample)",
            "teacher + teacher ControlNet",
            "one-step + student ControlNet",
            "one-step, no ControlNet",
        ],
        "prompts": prompts[: cfg.grid],
    }
    rep["control_edge_density"] = {k: float((v > 0).mean()) for k, v in sets.items()}
    return rep


def format_report(rep: dict) -> str:
    lines = [
        "# ControlNet (canny) on SHAPES-64: teacher ControlNet and its one-step student",
        "",
        f"{rep['n']} evaluation prompts (EVAL stream seed 0). Edge IoU: canny of the generated image vs the control edges, "
        "1-pixel tolerance (`sdxs_edge.control.edge_iou`). All-correct: the SHAPES-64 classifier against the prompt.",
        "",
        "## Consistent controls (canny of the render of the prompt's own scene): main table",
        "",
        "| model | steps | edge IoU | all-correct | position | shape | size | color | U-Net params | ControlNet params | CPU s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rep["models"].items():
        c = r["consistent"]
        lines.append(
            f"| {name} | {r['steps']} | {c['edge_iou']:.3f} | {c['all_correct']:.3f} | {c['position']:.3f} | {c['shape']:.3f} | {c['size']:.3f} | {c['color']:.3f} | {r['unet_params']:,} | {r['controlnet_params']:,} | {r['cpu_latency_s']:.3f} |"
        )
    lines += [
        "",
        "## Other-scene controls (canny of teacher samples of other prompts): does the control move the shape?",
        "",
        "All-correct is judged against the prompt, which these controls contradict (position / shape / size), so a "
        "model that follows the control scores lower here.",
        "",
        "| model | edge IoU | all-correct | position | shape | size | color |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rep["models"].items():
        c = r["other-scene"]
        lines.append(
            f"| {name} | {c['edge_iou']:.3f} | {c['all_correct']:.3f} | {c['position']:.3f} | {c['shape']:.3f} | {c['size']:.3f} | {c['color']:.3f} |"
        )
    g = rep["grid"]
    lines += [
        "",
        f"Grid (`{g['file']}`), columns: "
        + " | ".join(g["columns"])
        + ". Rows (prompts): "
        + "; ".join(g["prompts"])
        + ".",
    ]
    if "stage_seconds" in rep:
        lines += [
            "",
            "Stage wall-clock seconds (one CPU thread): "
            + ", ".join(f"{k} {v}" for k, v in rep["stage_seconds"].items()),
        ]
    if "training" in rep:
        lines += ["", "Training: " + json.dumps(rep["training"])]
    return "\n".join(lines) + "\n"


# ---- the run ----------------------------------------------------------------------------------------------------
def _training_logs(out: Path) -> dict:
    """Per training stage with a log: its step count, first and last logged losses, whether it stopped early."""
    training = {}
    for stage in ("teacher-controlnet", "controlnet"):
        log = out / stage / "log.jsonl"
        if log.is_file():
            recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            steps = [r for r in recs if "loss" in r]
            training[stage] = {
                "steps": steps[-1]["step"] if steps else 0,
                "first": steps[0] if steps else {},
                "last": steps[-1] if steps else {},
                "stopped_early": any(r.get("stopped_early") for r in recs),
            }
    return training


def _teacher_controlnet(cfg: ControlNetRunConfig, out: Path, teacher, done: Path, training: dict):
    """Stage 1 of `run_controlnet`: the teacher's ControlNet, loaded from `done` or trained and saved there."""
    from sdxs_edge.controlnet import SHAPES_EMBEDDING, controlnet_for_unet, load_controlnet, save_controlnet

    if done.is_dir():
        return load_controlnet(done, teacher.c.unet)
    torch.manual_seed(cfg.seed)
    cache = build_control_cache(teacher, cfg.teacher_cn.cache_size, out / "control-cache.safetensors", cfg.seed)
    t_cn = wake_conditioning(
        controlnet_for_unet(teacher.c.unet, SHAPES_EMBEDDING),
        torch.from_numpy(edges_to_control(cache["edges"][:64].numpy())),
        seed=cfg.seed,
    )
    t_cn, res = train_teacher_controlnet(cfg.teacher_cn, out / "teacher-controlnet", teacher, t_cn, cache, cfg.seed)
    training["teacher-controlnet"] = res.get("last", {})
    save_controlnet(t_cn, done, overwrite=True)
    return t_cn


def _student_controlnet(
    cfg: ControlNetRunConfig, out: Path, teacher_pair, student, triplets, done: Path, training: dict
):
    """Stage 3 of `run_controlnet`: the student's ControlNet on the frozen one-step U-Net, loaded or trained."""
    from sdxs_edge.controlnet import SHAPES_EMBEDDING, controlnet_for_unet, load_controlnet, save_controlnet

    if done.is_dir():
        return load_controlnet(done, student.c.unet)
    teacher, t_cn = teacher_pair
    torch.manual_seed(cfg.seed + 1)
    s_cn = wake_conditioning(
        controlnet_for_unet(student.c.unet, SHAPES_EMBEDDING),
        torch.from_numpy(edges_to_control(triplets["edges"][:64].numpy())),
        seed=cfg.seed + 1,
    )
    s_cn, res = train_student_controlnet(
        cfg.student_cn, out / "controlnet", student, s_cn, teacher, t_cn, triplets, cfg.seed
    )
    training["controlnet"] = res.get("last", {})
    save_controlnet(s_cn, done, overwrite=True)
    return s_cn


def run_controlnet(cfg: ControlNetRunConfig, out: str | Path, until: str = "report") -> dict:
    """teacher-controlnet -> triplets -> controlnet -> report, each resumed from `out/`; returns the report
    (or a summary when stopping earlier). Final ControlNets: `out/teacher-controlnet/controlnet`,
    `out/controlnet/controlnet` (float32) and fp16 copies under `out/export/`."""
    from safetensors.torch import load_file

    from sdxs_edge.controlnet import save_controlnet
    from sdxs_edge.pipeline import SDXSPipeline

    if until not in STAGES:
        raise SDXSError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    torch.set_num_threads(max(1, cfg.threads))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))
    clock = StageClock(out / "times.json")
    lap, times = clock.lap, clock.times

    teacher = SDXSPipeline.load(cfg.teacher, seed=cfg.seed)
    if teacher.default_steps == 1:
        raise SDXSError(
            f"{cfg.teacher} is a one-step model; the teacher must be a multi-step model (e.g. models/shapes-teacher)"
        )
    student = load_student(cfg.student, teacher)
    training: dict = {}

    # 1. Teacher ControlNet.
    t_done = out / "teacher-controlnet" / "controlnet"
    t_cn = _teacher_controlnet(cfg, out, teacher, t_done, training)
    lap("teacher-controlnet")
    if until == "teacher-controlnet":
        return {"teacher_controlnet": str(t_done), "stage_seconds": times}

    # 2. Triplets from the teacher's own samples.
    trip_file = out / "triplets.safetensors"
    if trip_file.is_file():
        triplets = load_file(str(trip_file))
    else:
        triplets = make_triplets(cfg.triplets, teacher, student, t_cn)
        _save_tensors(triplets, trip_file)
    lap("triplets")
    if until == "triplets":
        return {"triplets": str(trip_file), "n": len(triplets["noise"]), "stage_seconds": times}

    # 3. Student ControlNet on the frozen one-step U-Net.
    s_done = out / "controlnet" / "controlnet"
    s_cn = _student_controlnet(cfg, out, (teacher, t_cn), student, triplets, s_done, training)
    export = out / "export"
    export.mkdir(exist_ok=True)
    save_controlnet(t_cn, export / "shapes-teacher-controlnet-canny", overwrite=True, dtype=torch.float16)
    save_controlnet(s_cn, export / "shapes-controlnet-canny", overwrite=True, dtype=torch.float16)
    lap("controlnet")
    if until == "controlnet":
        return {"controlnet": str(s_done), "export": str(export), "stage_seconds": times}

    # 4. Report.
    rdir = out / "report"
    rdir.mkdir(exist_ok=True)
    rep = controlnet_report(cfg.report, teacher, t_cn, student, s_cn, rdir)
    lap("report")
    rep["stage_seconds"] = times
    rep["training"] = {**training, **_training_logs(out)}
    rep["config"] = asdict(cfg)
    _write_text(rdir / "report.json", json.dumps(rep, indent=2))
    _write_text(rdir / "report.md", format_report(rep))
    return rep
