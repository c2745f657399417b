"""Multi-GPU recipes for a real-size teacher, and the memory / time plan they imply.

    torchrun --nproc_per_node 8 -m sdxs_edge.cli train all --recipe sd21-512 --teacher SD21_FOLDER --prompts FILE
    accelerate launch --multi_gpu --num_processes 8 -m sdxs_edge.cli train all --recipe sd15-512 --teacher SD15_FOLDER --prompts FILE

`RECIPES` is the table (one `StageRecipe` per stage, keyword fields); `recipe_chain` turns a row into the
chain's config and `plan_markdown` into the plan in docs/any-teacher.md: parameters, weights + gradients +
AdamW state, saved activations per GPU and GPU-hours, from the layouts' own modules built on the meta
device (nothing is allocated or downloaded).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

from training.dist import Parallel

# The GPU-hour estimate: computed forward FLOPs (torch.utils.flop_counter), backward counted as twice
# the forward (plus one more forward under gradient checkpointing), at this share of this peak.
PEAK_FLOPS = 312e12  # A100 dense bf16
UTILISATION = 0.35


@dataclass(frozen=True)
class StageRecipe:
    """One stage of a recipe. Args:
    steps: optimizer steps. batch: global batch (all GPUs, all micro-batches). lr: learning rate.
    precision: "bf16" (autocast) or "fp32". fsdp: shard the trainable U-Nets (else DDP).
    grad_accum: micro-batches per step. checkpointing: gradient checkpointing of the trainable U-Nets.
    hours: wall-clock budget of the stage (it checkpoints and stops when spent); None = none.
    online_lr: score distillation only: the online DM's learning rate.
    """

    steps: int
    batch: int
    lr: float
    precision: str = "bf16"
    fsdp: bool = False
    grad_accum: int = 1
    checkpointing: bool = False
    hours: float | None = None
    online_lr: float | None = None

    @property
    def parallel(self) -> Parallel:
        return Parallel(self.fsdp, self.grad_accum, self.precision, self.checkpointing)

    @property
    def max_seconds(self) -> float | None:
        return self.hours * 3600 if self.hours else None


@dataclass(frozen=True)
class Recipe:
    """A teacher family at a resolution on `gpus` GPUs: the ODE pairs and one `StageRecipe` per stage."""

    name: str
    summary: str
    layout: str  # the teacher layout the plan is computed for ("sd21-base" or "sd15")
    resolution: int
    gpus: int
    pairs: int
    pair_steps: int
    decoder: StageRecipe
    unet_kd: StageRecipe
    warmup: StageRecipe
    ssd: StageRecipe
    decoder_adapt: StageRecipe
    adapt_latents: int = 8192


_SD_512 = dict(
    resolution=512,
    gpus=8,
    pairs=65536,
    pair_steps=25,
    decoder=StageRecipe(steps=20000, batch=32, lr=1e-3, hours=2),
    unet_kd=StageRecipe(steps=50000, batch=256, lr=5e-5, grad_accum=2, checkpointing=True, hours=20),
    warmup=StageRecipe(steps=10000, batch=256, lr=1e-5, grad_accum=2, checkpointing=True, hours=4),
    ssd=StageRecipe(steps=10000, batch=128, lr=5e-6, online_lr=5e-6, fsdp=True, checkpointing=True, hours=8),
    decoder_adapt=StageRecipe(steps=5000, batch=32, lr=3e-4, hours=1),
)
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(name="sd21-512", summary="SD-2.1-base -> SDXS-512 layout", layout="sd21-base", **_SD_512),
        Recipe(name="sd15-512", summary="SD-1.5 -> its block-removed layout", layout="sd15", **_SD_512),
    )
}


def recipe_chain(name: str, base, smoke: bool = False):
    """The chain config (`training.chain.ChainConfig`) `base` with recipe `name`'s stages and data sizes;
    `smoke`: keep `base`'s sizes (a smoke run) and take only each stage's DDP / FSDP, precision and
    gradient checkpointing from the recipe."""
    from training.decoder import DecoderConfig
    from training.onestep import SSDConfig, WarmupConfig
    from training.unet_kd import UNetKDConfig

    r = RECIPES[name]
    if smoke:
        stages = {k: getattr(base, k) for k in ("decoder", "unet_kd", "warmup", "ssd", "decoder_adapt")}
        return replace(
            base, **{k: replace(c, parallel=replace(getattr(r, k).parallel, grad_accum=1)) for k, c in stages.items()}
        )

    def common(s: StageRecipe) -> dict:
        return dict(steps=s.steps, batch=s.batch, lr=s.lr, max_seconds=s.max_seconds, parallel=s.parallel)

    ssd = SSDConfig(**common(r.ssd), online_lr=r.ssd.online_lr or SSDConfig.online_lr, guidance=4.5)
    return replace(
        base,
        decoder=DecoderConfig(**common(r.decoder), gan_start=r.decoder.steps // 10),
        unet_kd=UNetKDConfig(**common(r.unet_kd)),
        warmup=WarmupConfig(**common(r.warmup), loss="mse"),
        ssd=ssd,
        decoder_adapt=DecoderConfig(**common(r.decoder_adapt), gan_start=r.decoder_adapt.steps // 10),
        adapt_latents=r.adapt_latents,
        pairs=r.pairs,
        pair_steps=r.pair_steps,
        resolution=r.resolution,
    )


# ---- the plan ------------------------------------------------------------------------------------------
def layout_configs(layout: str) -> dict[str, dict]:
    """U-Net, text encoder and VAE configs of a teacher layout; SD-1.5 is SD-2.1-base's U-Net with 8-head
    attention on 768-wide CLIP ViT-L/14 context (the text encoder of the sdxs-512 preset)."""
    from sdxs_edge.presets import get_preset

    sd21 = get_preset("sd21-base")
    if layout == "sd21-base":
        return {"unet": dict(sd21.unet), "text": dict(sd21.text_encoder), "vae": dict(sd21.vae)}
    clip_l = get_preset("sdxs-512").text_encoder
    unet = {**sd21.unet, "attention_head_dim": 8, "cross_attention_dim": 768, "use_linear_projection": False}
    return {"unet": unet, "text": dict(clip_l), "vae": dict(sd21.vae)}


class _SavesLikeFlash:
    """Attention that saves q, k, v and its output for backward, as flash / memory-efficient attention
    kernels do (the meta device's math kernel would save the full score matrix)."""

    def __init__(self, sdpa):
        import torch

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out = sdpa(q, k, v)
                ctx.save_for_backward(q, k, v, out)
                return out

        self.fn = Fn

    def __call__(self, q, k, v, *args, **kwargs):
        return self.fn.apply(q, k, v)


def _measure(module, args: tuple, checkpointing: bool = False) -> dict:
    """Forward FLOPs (no grad) and bytes of tensors saved for backward (with grad), per call."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*args)
    saved: dict[int, int] = {}

    def pack(t):
        saved[id(t)] = t.numel() * t.element_size()
        return t

    if checkpointing:
        module.enable_gradient_checkpointing()
    sdpa, F.scaled_dot_product_attention = (
        F.scaled_dot_product_attention,
        _SavesLikeFlash(F.scaled_dot_product_attention),
    )
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module.train()(*args)
    finally:
        F.scaled_dot_product_attention = sdpa
        if checkpointing:
            module.disable_gradient_checkpointing()
    return {"flops": counter.get_total_flops(), "saved": sum(saved.values()), "params": _params(module)}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class _Models:
    """Per-sample measurements of the modules of one layout at one resolution."""

    m: dict = field(default_factory=dict)

    def __getitem__(self, k: str) -> dict:
        return self.m[k]


@lru_cache(maxsize=4)
def measure_layout(layout: str, resolution: int) -> _Models:
    """Measure (meta device, batch 1) every module the chain trains or holds for `layout`."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdxs_edge.presets import block_removed
    from training.decoder import PatchDiscriminator
    from training.generic import TAESD
    from training.onestep import UNetEncoder

    c, h = layout_configs(layout), resolution // 8
    with torch.device("meta"):
        teacher = UNet2DConditionModel(**c["unet"])
        student = UNet2DConditionModel(**block_removed(teacher.config))
        text = CLIPTextModel(CLIPTextConfig(**c["text"]))
        vae, taesd, disc = AutoencoderKL(**c["vae"]), AutoencoderTiny(**TAESD), PatchDiscriminator()
        z, t = torch.randn(1, 4, h, h), torch.tensor([500])
        ctx, img = torch.randn(1, 77, c["unet"]["cross_attention_dim"]), torch.randn(1, 3, resolution, resolution)
        ids = torch.zeros(1, 77, dtype=torch.long)
    out = _Models()
    out.m["teacher"] = _measure(teacher, (z, t, ctx))
    out.m["teacher_ckpt"] = _measure(teacher, (z, t, ctx), checkpointing=True)
    out.m["student"] = _measure(student, (z, t, ctx))
    out.m["student_ckpt"] = _measure(student, (z, t, ctx), checkpointing=True)
    out.m["encoder"] = _measure(UNetEncoder(teacher), (z, ctx))
    out.m["text"] = {"flops": _measure(text, (ids,))["flops"], "params": _params(text)}
    out.m["vae"] = {"flops": _measure(vae.decoder, (z,))["flops"], "params": _params(vae)}
    out.m["taesd"] = _measure(taesd.decoder, (z,))
    out.m["disc"] = _measure(disc, (img,))
    return out


def stage_plan(name: str) -> list[dict]:
    """Per stage of recipe `name`: trainable and resident frozen parameters, per-GPU GiB of trainable
    state (fp32 weights + gradients + AdamW moments, split over the GPUs under FSDP), of resident frozen
    fp32 weights and of saved activations for one micro-batch, and GPU-hours (`PEAK_FLOPS`, `UTILISATION`)."""
    r = RECIPES[name]
    m = measure_layout(r.layout, r.resolution)
    teacher_pipe = m["teacher"]["params"] + m["vae"]["params"] + m["text"]["params"]
    rows = []
    for stage, s, trainable, resident, saved, flops in _stage_terms(r, m):
        micro = s.batch // r.gpus // s.grad_accum
        shards = r.gpus if s.fsdp else 1
        act = saved * micro * (0.5 if s.precision == "bf16" else 1.0)
        rows.append(
            {
                "stage": stage,
                "steps": s.steps,
                "batch": s.batch,
                "micro": micro,
                "parallel": ("FSDP" if s.fsdp else "DDP") + (" + ckpt" if s.checkpointing else ""),
                "trainable": trainable,
                "frozen": teacher_pipe + resident,
                "state_gib": trainable * 16 / shards / 2**30,
                "frozen_gib": (teacher_pipe + resident) * 4 / 2**30,
                "act_gib": act / 2**30,
                "gpu_hours": s.steps * s.batch * flops / (PEAK_FLOPS * UTILISATION) / 3600,
            }
        )
    pair_flops = 2 * m["text"]["flops"] + 2 * r.pair_steps * m["teacher"]["flops"]
    rows.append(
        {"stage": "ode pairs", "steps": r.pairs, "gpu_hours": r.pairs * pair_flops / (PEAK_FLOPS * UTILISATION) / 3600}
    )
    return rows


def _stage_terms(r: Recipe, m: _Models):
    """(stage, recipe, trainable params, resident frozen params beyond the teacher, saved bytes per
    sample, training FLOPs per sample) of each stage, as the chain runs it."""

    def unet(key: str, s: StageRecipe) -> tuple[int, int]:
        """(saved bytes, FLOPs of forward + backward) of a trainable U-Net."""
        k = f"{key}_ckpt" if s.checkpointing else key
        return m[k]["saved"], m[key]["flops"] * (4 if s.checkpointing else 3)

    S, T, E, tx = m["student"], m["teacher"], m["encoder"], m["text"]["flops"]
    dec_p = m["taesd"]["params"] + m["disc"]["params"]
    dec_saved = m["taesd"]["saved"] + 2 * m["disc"]["saved"]
    dec_flops = m["vae"]["flops"] + 3 * m["taesd"]["flops"] + 9 * m["disc"]["flops"]
    kd_saved, kd_flops = unet("student", r.unet_kd)
    wu_saved, wu_flops = unet("student", r.warmup)
    ss_saved, ss_flops = unet("student", r.ssd)
    on_saved, on_flops = unet("teacher", r.ssd)
    ssd_flops = tx + ss_flops + 3 * T["flops"] + 4 * E["flops"] + on_flops
    return [
        ("decoder", r.decoder, dec_p, 0, dec_saved, dec_flops),
        ("unet-kd", r.unet_kd, S["params"], 0, kd_saved, tx + T["flops"] + kd_flops),
        ("warmup", r.warmup, S["params"], S["params"], wu_saved, tx + wu_flops),
        (
            "score-distill",
            r.ssd,
            S["params"] + T["params"],
            2 * S["params"],
            max(ss_saved + E["saved"], on_saved),
            ssd_flops,
        ),
        ("decoder-adapt", r.decoder_adapt, dec_p, 3 * S["params"], dec_saved, dec_flops),
    ]


def plan_markdown(name: str) -> str:
    """The plan table of recipe `name` as it stands in docs/any-teacher.md."""
    r = RECIPES[name]
    rows = stage_plan(name)
    lines = [
        f"**`{name}`** ({r.summary}, {r.resolution}x{r.resolution}, {r.gpus} GPUs, {r.pairs:,} ODE pairs of {r.pair_steps} steps)",
        "",
        "| stage | steps | global batch | per-GPU micro-batch | parallel | trainable params | resident frozen params | trainable state GiB/GPU | frozen weights GiB/GPU | activations GiB/GPU | GPU-hours |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows[:-1]:
        lines.append(
            f"| {x['stage']} | {x['steps']:,} | {x['batch']} | {x['micro']} | {x['parallel']} | {x['trainable'] / 1e6:,.1f}M "
            f"| {x['frozen'] / 1e6:,.0f}M | {x['state_gib']:.1f} | {x['frozen_gib']:.1f} | {x['act_gib']:.1f} | {x['gpu_hours']:,.0f} |"
        )
    pairs = rows[-1]
    total = sum(x["gpu_hours"] for x in rows)
    lines.append(
        f"| ode pairs | {pairs['steps']:,} pairs | | | sharded by rank | | | | | | {pairs['gpu_hours']:,.0f} |"
    )
    lines += ["", f"Total: about {total:,.0f} GPU-hours ({total / r.gpus:,.0f} hours on {r.gpus} GPUs).", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # the plan tables, as docs/any-teacher.md holds them
    print("\n".join(plan_markdown(name) for name in RECIPES))
