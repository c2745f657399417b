"""Style LoRAs the SDXS way (arXiv 2403.16627 Sec. 3.4, Fig. 4): a style LoRA of the teacher, distilled
into a LoRA of the one-step student.

1. `train_style_lora`: a peft LoRA on the teacher U-Net learns a style from renders of it (SHAPES-64:
   "outline", the shape drawn as a 2 px outline instead of filled) with the teacher's own denoising
   loss; the base weights and the text encoder stay frozen. This stands in for a pretrained style LoRA.
2. `distill_lora`: the one-step student gets a fresh LoRA (the only trainable weights) and is trained
   with segmented score distillation (training/onestep.py), skipping the feature-matching warm-up:
   - the offline DM is the teacher U-Net with the style LoRA fused in;
   - the online DM starts from the teacher U-Net *without* the LoRA (the LoRA never goes into the online
     DM: it models the student's current outputs, which start in the base style);
   - the feature-matching segment matches teacher ODE samples; when the teacher can take the LoRA (it can
     here) the samples are drawn with it, otherwise without it and lambda_FM is scaled down
     (`fm_scale_without_teacher_lora`), since those samples then pull towards the base style.
3. The student LoRA is written in the peft / diffusers layout (`unet.<module>.lora_A.weight`, ...) that
   `sdxs_edge.lora` fuses for deployment (`convert --lora`, `generate --lora`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sdxs_edge.atomic import atomic_file, write_atomic
from training.loop import LoopConfig, Progress, StageClock, cosine_lr, run_loop, set_lr
from training.onestep import SSDConfig, make_ode_pairs, score_distill

# Linear and conv layers a style LoRA adapts: attention and feed-forward projections, and the ResNet
# convolutions (a style that changes what is drawn, not only how it is arranged, needs the convs).
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
)
STAGES = ("style-lora", "pairs", "lora-distill", "report", "all")


@dataclass(frozen=True)
class StyleLoRAConfig:
    """Args:
    style: the style renders are drawn in (sdxs_edge.shapes.STYLES).
    steps: optimizer steps.
    batch: latents per step.
    lr: AdamW learning rate of the LoRA weights (cosine to 10 %).
    rank: LoRA rank.
    alpha: LoRA alpha (scale alpha / rank).
    targets: module-name suffixes that get a LoRA.
    cache_size: style renders encoded once by the teacher VAE.
    cfg_dropout: share of captions replaced by the empty prompt (keeps guidance working).
    high_t_share: share of the batch drawn from t >= T/2 (layout and shape are set at high t).
    snr_weight_cap: per-sample epsilon-loss weight min(1/SNR(t), cap), as the teacher's phase 2.
    max_seconds: wall-clock budget; None = none.
    ckpt_every: steps between checkpoints (a killed run resumes from the last one).
    log_every: steps between log lines.
    seed: data and noise seed.
    """

    style: str = "outline"
    steps: int = 1500
    batch: int = 32
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = LORA_TARGETS
    cache_size: int = 4096
    cfg_dropout: float = 0.1
    high_t_share: float = 0.5
    snr_weight_cap: float = 5.0
    max_seconds: float | None = None
    ckpt_every: int = 250
    log_every: int = 25
    seed: int = 0


@dataclass(frozen=True)
class LoRADistillConfig:
    """Args:
    ssd: segmented score distillation settings (student LoRA learning rate in `ssd.lr`).
    rank: rank of the student's LoRA.
    alpha: its alpha.
    targets: module-name suffixes of the student that get a LoRA.
    pairs: teacher ODE samples for the feature-matching segment.
    pair_steps: Euler steps of those samples.
    teacher_takes_lora: draw the ODE samples with the style LoRA in the teacher (False: without, and
        lambda_FM scaled by `fm_scale_without_teacher_lora`).
    fm_scale_without_teacher_lora: lambda_FM factor when the teacher cannot take the LoRA.
    """

    ssd: SSDConfig = SSDConfig(
        steps=600,
        batch=32,
        lr=2e-3,
        online_lr=1e-4,
        guidance=2.5,
        alpha_start=0.95,
        alpha_end=0.7,
        fm_start=4.0,
        fm_end=1.0,
    )
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = LORA_TARGETS
    pairs: int = 1024
    pair_steps: int = 25
    teacher_takes_lora: bool = True
    fm_scale_without_teacher_lora: float = 0.1


@dataclass(frozen=True)
class LoRAChainConfig:
    """Args:
    teacher: the teacher model folder.
    student: the one-step student folder.
    style_lora: the teacher's style LoRA training.
    distill: the one-step LoRA distillation.
    eval_n: evaluation prompts per report row.
    eval_steps: teacher sampling steps in the report.
    eval_guidance: teacher guidance in the report.
    threads: CPU threads.
    """

    teacher: str = "models/shapes-teacher"
    student: str = "sdxs_edge/default_model"
    style_lora: StyleLoRAConfig = StyleLoRAConfig(max_seconds=1800)
    distill: LoRADistillConfig = LoRADistillConfig(ssd=replace(LoRADistillConfig().ssd, max_seconds=2100))
    eval_n: int = 512
    eval_steps: int = 25
    eval_guidance: float = 2.5
    threads: int = 2


def smoke_lora_chain(teacher: str, student: str) -> LoRAChainConfig:
    """Seconds-long settings for tests (any teacher / student pair, e.g. presets saved to folders)."""
    return LoRAChainConfig(
        teacher=teacher,
        student=student,
        style_lora=StyleLoRAConfig(steps=3, batch=4, cache_size=8, rank=2, alpha=2.0, ckpt_every=2, log_every=1),
        distill=LoRADistillConfig(
            ssd=SSDConfig(steps=3, batch=4, lr=1e-3, guidance=2.5, ckpt_every=2, log_every=1),
            rank=2,
            alpha=2.0,
            pairs=8,
            pair_steps=2,
        ),
        eval_n=8,
        eval_steps=2,
        threads=1,
    )


# ---- peft helpers ------------------------------------------------------------------------------------
def add_lora(unet, rank: int, alpha: float, targets: tuple[str, ...], seed: int = 0):
    """Freeze `unet` and inject a peft LoRA (B = 0, so the output is unchanged at first); returns its params."""
    from peft import LoraConfig

    names = [n for n, _ in unet.named_modules()]
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        raise ValueError(f"no module of the U-Net matches the LoRA targets {list(targets)}")
    unet.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
        )
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ValueError(f"no module of the U-Net matches the LoRA targets {targets}")
    return params


def lora_state(unet, alpha: float) -> dict[str, torch.Tensor]:
    """The injected LoRA as a file state dict: `unet.<module>.lora_A.weight`, `.lora_B.weight`, `.alpha`."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        out[f"unet.{k}"] = v.detach().float().cpu().contiguous()
        if k.endswith(".lora_A.weight"):
            out[f"unet.{k[: -len('.lora_A.weight')]}.alpha"] = torch.tensor(float(alpha))
    return out


def remove_lora(unet) -> None:
    """Take an injected peft LoRA out again, leaving the base U-Net as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent = unet.get_submodule(name.rsplit(".", 1)[0]) if "." in name else unet
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    unet._hf_peft_config_loaded = False
    if hasattr(unet, "peft_config"):
        del unet.peft_config


# ---- 1. the teacher's style LoRA ------------------------------------------------------------------------
def style_latents(cfg: StyleLoRAConfig, teacher, path: Path) -> dict:
    """Encode `cache_size` renders in the style with the teacher VAE (posterior mean and std) + token ids."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from sdxs_edge import shapes

    if path.is_file():
        return load_file(str(path))
    means, stds, ids = [], [], []
    stream = shapes.train_stream(256, seed=cfg.seed + 11, style=cfg.style)
    with torch.no_grad():
        for _ in tqdm(range(math.ceil(cfg.cache_size / 256)), desc=f"{cfg.style} latents"):
            b = next(stream)
            post = teacher.c.vae.encode(
                torch.from_numpy(shapes.to_tensor_range(b.images)).to(teacher.device)
            ).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
            ids.append(teacher.tokenize(b.captions).int())
    cache = {
        "mean": torch.cat(means)[: cfg.cache_size].contiguous(),
        "std": torch.cat(stds)[: cfg.cache_size].contiguous(),
        "ids": torch.cat(ids)[: cfg.cache_size].contiguous(),
    }
    with atomic_file(path) as tmp:
        save_file(cache, str(tmp))
    return cache


def train_style_lora(cfg: StyleLoRAConfig, out: Path, teacher, acp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Train a style LoRA on the teacher U-Net; returns the LoRA state dict (the U-Net is left unchanged)."""
    out.mkdir(parents=True, exist_ok=True)
    cache = style_latents(cfg, teacher, out / "latents.safetensors")
    unet, te = teacher.c.unet, teacher.c.text_encoder.requires_grad_(False).eval()
    params = add_lora(unet, cfg.rank, cfg.alpha, cfg.targets, cfg.seed)
    unet.train()
    opt = torch.optim.AdamW(params, cfg.lr, weight_decay=0.0)
    dev = teacher.device
    scale = teacher.latent_scaling
    empty = teacher.tokenize([""])[0].int()
    n, T = cache["mean"].shape[0], acp.numel()
    acp = acp.to(dev)
    progress = Progress(cfg.steps, cfg.max_seconds)

    def step(k: int) -> dict:
        set_lr(opt, cosine_lr(cfg.lr, k, progress(k), floor=0.1))
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        z0 = ((cache["mean"][idx] + cache["std"][idx] * torch.randn(cache["mean"][idx].shape, generator=g)) * scale).to(
            dev
        )
        ids = cache["ids"][idx].clone()
        ids[torch.rand(cfg.batch, generator=g) < cfg.cfg_dropout] = empty
        t = torch.randint(0, T, (cfg.batch,), generator=g)
        high = torch.rand(cfg.batch, generator=g) < cfg.high_t_share
        t = torch.where(high, torch.randint(T // 2, T, (cfg.batch,), generator=g), t).to(dev)
        eps = torch.randn(z0.shape, generator=g).to(dev)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        w = ((1 - acp[t]) / acp[t]).clamp(max=cfg.snr_weight_cap)
        w = w / w.mean()
        with torch.no_grad():
            ctx = te(ids.long().to(dev))[0]
        loss = (w * (unet(zt, t, ctx).sample - eps).square().flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return {"loss": loss.item()}

    run_loop(
        "style-lora",
        out,
        LoopConfig(cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, max_seconds=cfg.max_seconds),
        step,
        {"unet": unet},
        {"opt": opt},
    )
    state = lora_state(unet, cfg.alpha)
    remove_lora(unet)
    unet.eval()
    return state


# ---- 2. the one-step LoRA ---------------------------------------------------------------------------------
def distill_lora(
    cfg: LoRADistillConfig,
    out: Path,
    student_pipe,
    teacher_with_lora,
    teacher_base_unet,
    pairs: dict,
    acp: torch.Tensor,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Segmented score distillation of a LoRA on the one-step student; returns the LoRA state dict.

    Args:
        student_pipe: the one-step pipeline (its U-Net gets the LoRA, then has it removed again).
        teacher_with_lora: the teacher pipeline with the style LoRA fused into its U-Net (the offline DM).
        teacher_base_unet: the teacher U-Net without the LoRA (the online DM's initialisation).
        pairs: teacher ODE samples (noise, ids, x0) for the feature-matching segment.
    """
    ssd = cfg.ssd
    if not cfg.teacher_takes_lora:
        ssd = replace(
            ssd,
            fm_start=ssd.fm_start * cfg.fm_scale_without_teacher_lora,
            fm_end=ssd.fm_end * cfg.fm_scale_without_teacher_lora,
        )
    unet = student_pipe.c.unet
    add_lora(unet, cfg.rank, cfg.alpha, cfg.targets, seed)
    score_distill(
        ssd,
        out,
        unet,
        student_pipe.c.text_encoder,
        teacher_with_lora.c.unet,
        pairs,
        student_pipe.one_step_constants(),
        acp,
        teacher_with_lora.tokenize([""])[0],
        seed=seed,
        online_init=teacher_base_unet,
    )
    state = lora_state(unet, cfg.alpha)
    remove_lora(unet)
    unet.eval()
    return state


# ---- evaluation -------------------------------------------------------------------------------------------
def style_eval(
    pipe, n: int, steps: int | None, guidance: float | None, evaluator, seed: int = 0
) -> tuple[dict, np.ndarray]:
    """All-correct rate and attribute accuracy (style evaluator) plus the share drawn as outlines."""
    from sdxs_edge import shapes
    from sdxs_edge.evaluate import EvalSettings, evaluate_pipeline

    rep, images = evaluate_pipeline(
        pipe, EvalSettings(n=n, steps=steps, guidance=guidance, batch=64, seed=seed), evaluator, progress=False
    )
    pred = evaluator.classify(images)
    rep["outline_rate"] = float((pred["style"] == shapes.STYLES.index("outline")).mean())
    return rep, images


@torch.no_grad()
def decoder_ceiling(teacher, student, evaluator, n: int) -> dict:
    """What the latent space lets any U-Net LoRA reach: outline renders encoded by the teacher VAE and decoded
    by the teacher's decoder and by the student's tiny decoder, then scored like generated images."""
    from sdxs_edge import shapes
    from sdxs_edge.evaluate import accuracy_report

    b = shapes.make_batch(shapes.eval_scenes(n, seed=7, style="outline"))
    x = torch.from_numpy(shapes.to_tensor_range(b.images)).to(teacher.device)
    z = teacher.c.vae.encode(x).latent_dist.mean * teacher.latent_scaling

    def score(images: np.ndarray) -> dict:
        pred = evaluator.classify(images)
        return {
            "outline_rate": float((pred["style"] == shapes.STYLES.index("outline")).mean()),
            **accuracy_report(pred, b.labels),
        }

    out = {"renders": score(b.images)}
    for name, pipe in (("teacher_decoder", teacher), ("tiny_decoder", student)):
        img = pipe.decode(z.to(pipe.device))
        out[name] = score(
            ((img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        )
    return out


def _with_lora(base, lora_file: Path, name: str, steps: int, guidance: float):
    """A pipeline sharing `base`'s modules but a copy of its U-Net with the LoRA fused in."""
    from sdxs_edge.lora import fuse_lora, load_lora
    from sdxs_edge.pipeline import SDXSPipeline

    p = SDXSPipeline(replace(base.c, unet=copy.deepcopy(base.c.unet)), name=name)
    p.default_steps, p.default_guidance = steps, guidance
    fuse_lora(p.c.unet, load_lora(lora_file))
    return p


def _lora_parameters(lora_file: Path) -> int:
    from safetensors.torch import load_file

    return int(sum(v.numel() for key, v in load_file(str(lora_file)).items() if "lora_" in key))


def _style_table(cfg: LoRAChainConfig, ev, out: Path, models: list) -> dict:
    """The report's table and grids: teacher, teacher + style LoRA, one-step, one-step + distilled LoRA."""
    from sdxs_edge import shapes
    from sdxs_edge.evaluate import STYLE_EVALUATOR_DIR, save_grid

    teacher, teacher_lora, student, student_lora = models
    rows = [
        ("teacher", teacher, cfg.eval_steps, cfg.eval_guidance, "none"),
        ("teacher + style LoRA", teacher_lora, cfg.eval_steps, cfg.eval_guidance, "teacher LoRA"),
        ("one-step", student, 1, 0.0, "none"),
        ("one-step + distilled LoRA", student_lora, 1, 0.0, "one-step LoRA"),
    ]
    report: dict = {
        "evaluator": str(STYLE_EVALUATOR_DIR),
        "evaluator_heldout": ev.meta.get("heldout_accuracy"),
        "models": [],
    }
    grids = []
    for name, pipe, steps, guidance, lora in rows:
        rep, images = style_eval(pipe, cfg.eval_n, steps, guidance, ev)
        report["models"].append(
            {
                "model": name,
                "lora": lora,
                "steps": steps,
                "guidance": guidance,
                **{k: rep[k] for k in ("outline_rate", "all_correct", *shapes.ATTRIBUTES, "fid_shapes", "n")},
            }
        )
        grids.append(images[:16])
        save_grid(images, out / f"grid-{name.replace(' ', '-').replace('+', 'plus')}.png", cols=16, limit=32)
    save_grid(np.concatenate(grids), out / "grid.png", cols=16, limit=64)
    return report


def run_lora_chain(cfg: LoRAChainConfig, out: str | Path, until: str = "all") -> dict:
    """Teacher style LoRA -> teacher ODE pairs with it -> one-step LoRA distillation -> report; resumable."""
    from safetensors.torch import load_file, save_file

    from sdxs_edge import sampler, shapes
    from sdxs_edge.evaluate import STYLE_EVALUATOR_DIR, Evaluator
    from sdxs_edge.lora import save_lora
    from sdxs_edge.pipeline import SDXSPipeline

    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    torch.set_num_threads(max(1, min(cfg.threads, os.cpu_count() or 1)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(asdict(cfg), indent=2, default=str))
    clock = StageClock(out / "times.json")
    lap = clock.lap

    teacher = SDXSPipeline.load(cfg.teacher)
    acp = torch.from_numpy(sampler.alphas_cumprod(teacher.c.scheduler_config))

    # 1. The teacher's style LoRA.
    teacher_lora_file = out / "teacher-lora" / "pytorch_lora_weights.safetensors"
    if not teacher_lora_file.is_file():
        state = train_style_lora(cfg.style_lora, out / "teacher-lora", teacher, acp)
        save_lora(teacher_lora_file, state)
    lap("style-lora")
    if until == "style-lora":
        return {"teacher_lora": str(teacher_lora_file)}
    teacher_base_unet = copy.deepcopy(teacher.c.unet)
    teacher_lora = _with_lora(
        teacher, teacher_lora_file, f"{teacher.name} + style LoRA", teacher.default_steps, teacher.default_guidance
    )

    # 2. Teacher ODE samples for the feature-matching segment.
    pairs_file = out / "pairs.safetensors"
    if not pairs_file.is_file():
        caps = [s.caption for s in shapes.eval_scenes(cfg.distill.pairs, seed=4243)]  # not an evaluation seed
        source = teacher_lora if cfg.distill.teacher_takes_lora else teacher
        p = make_ode_pairs(source, caps, cfg.distill.pair_steps, cfg.eval_guidance, batch=64, seed=2)
        with atomic_file(pairs_file) as tmp:
            save_file(p, str(tmp))
    pairs = load_file(str(pairs_file))
    lap("pairs")
    if until == "pairs":
        return {"pairs": str(pairs_file)}

    # 3. The one-step LoRA.
    student = SDXSPipeline.load(cfg.student)
    student_lora_file = out / "one-step-lora" / "pytorch_lora_weights.safetensors"
    if not student_lora_file.is_file():
        state = distill_lora(
            cfg.distill,
            out / "one-step-lora",
            student,
            teacher_lora,
            teacher_base_unet,
            pairs,
            acp,
            seed=cfg.style_lora.seed,
        )
        save_lora(student_lora_file, state)
    lap("lora-distill")
    if until == "lora-distill":
        return {"one_step_lora": str(student_lora_file)}

    # 4. Report: style evaluator on teacher / one-step, each with and without its LoRA.
    ev = Evaluator.load(STYLE_EVALUATOR_DIR)
    student_lora = _with_lora(student, student_lora_file, f"{student.name} + one-step LoRA", 1, 0.0)
    report = _style_table(cfg, ev, out, [teacher, teacher_lora, student, student_lora])
    report["ceiling"] = decoder_ceiling(teacher, student, ev, cfg.eval_n)
    report["lora_files"] = {"teacher": str(teacher_lora_file), "one_step": str(student_lora_file)}
    report["lora_parameters"] = {
        k: _lora_parameters(f) for k, f in (("teacher", teacher_lora_file), ("one_step", student_lora_file))
    }
    lap("report")
    report["seconds"] = clock.times
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    write_atomic(out / "report.md", format_lora_report(report) + "\n")
    return report


def format_lora_report(report: dict) -> str:
    lines = [
        "| model | LoRA | steps | drawn as outline | all-correct | size | color | shape | position | background |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        lines.append(
            f"| {m['model']} | {m['lora']} | {m['steps']} | {m['outline_rate']:.3f} | {m['all_correct']:.3f} | {m['size']:.3f} | {m['color']:.3f} | {m['shape']:.3f} | {m['position']:.3f} | {m['background']:.3f} |"
        )
    p = report.get("lora_parameters", {})
    c = report.get("ceiling")
    if c:
        lines.append("")
        lines.append(
            "What the latent space allows: outline renders (no model) encoded by the teacher VAE and decoded again, scored the same way:"
        )
        lines.append("")
        lines.append(
            "| outline renders | drawn as outline | all-correct | size | color | shape | position | background |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for key, name in (
            ("renders", "as rendered"),
            ("teacher_decoder", "teacher VAE round trip"),
            ("tiny_decoder", "teacher VAE encoder, tiny decoder"),
        ):
            m = c[key]
            lines.append(
                f"| {name} | {m['outline_rate']:.3f} | {m['all_correct']:.3f} | {m['size']:.3f} | {m['color']:.3f} | {m['shape']:.3f} | {m['position']:.3f} | {m['background']:.3f} |"
            )
    lines.append("")
    lines.append(
        f"LoRA parameters: teacher {p.get('teacher', 0):,}, one-step {p.get('one_step', 0):,}. Style evaluator held-out accuracy: {report.get('evaluator_heldout')}."
    )
    return "\n".join(lines)
