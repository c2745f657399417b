"""Named model presets: one table, each a frozen dataclass.

A preset describes an architecture; `sdxs_edge.models.build_components` turns it into random-init
diffusers / transformers modules in seconds, so every tool (info, convert, bench) runs on the real
layout without weights. Configs are plain dicts in the exact keyword form of the diffusers /
transformers class they feed, so a saved folder is a normal diffusers folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sdxs_edge.errors import ModelLoadError


def _frozen(d: dict) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


# Scheduler of SD-2.1-base / SDXS (ANCHORS.md): scaled-linear betas, 1000 steps, trailing spacing so
# that one step runs at t=999.
SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}


@dataclass(frozen=True)
class ModelPreset:
    """An architecture, ready to build with random weights.

    Args:
        name: key in `PRESETS`.
        summary: one line shown by `sdxs-edge info` and in error messages.
        resolution: image side in pixels the model is made for (latents are resolution // 8).
        text_encoder: `transformers.CLIPTextConfig` keyword arguments.
        unet: `diffusers.UNet2DConditionModel` keyword arguments.
        vae_class: "AutoencoderKL" (SD teacher) or "AutoencoderTiny" (SDXS tiny decoder).
        vae: keyword arguments of `vae_class`.
        scheduler: `diffusers.EulerDiscreteScheduler` keyword arguments.
        pad_token: tokenizer pad token ("<|endoftext|>" for CLIP ViT-L, "!" for OpenCLIP-H, as released).
        default_steps: sampling steps `generate` uses when `--steps` is not given (1 for one-step students).
        default_guidance: classifier-free guidance scale used by default (0 = off, as SDXS runs).
        layer_map: for block-removed students, student parameter prefix -> teacher prefix used for weight
            init and feature distillation (data, not code; arXiv 2403.16627 Sec. 3.2, after BK-SDM).
        teacher: the preset this student is distilled from, if any.
    """

    name: str
    summary: str
    resolution: int
    text_encoder: Mapping[str, Any]
    unet: Mapping[str, Any]
    vae_class: str
    vae: Mapping[str, Any]
    scheduler: Mapping[str, Any] = field(default_factory=lambda: _frozen(SD_SCHEDULER))
    pad_token: str = "<|endoftext|>"
    default_steps: int = 1
    default_guidance: float = 0.0
    layer_map: Mapping[str, str] = field(default_factory=lambda: _frozen({}))
    teacher: str | None = None

    @property
    def latent_size(self) -> int:
        return self.resolution // 8


def _clip_text(
    *, hidden: int, layers: int, heads: int, intermediate: int, projection: int, act: str
) -> Mapping[str, Any]:
    return _frozen(
        {
            "vocab_size": 49408,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": 77,
            "projection_dim": projection,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        }
    )


def _unet(
    *,
    channels: tuple[int, ...],
    down: tuple[str, ...],
    up: tuple[str, ...],
    mid: str | None,
    layers: int,
    heads: int | tuple[int, ...],
    context: int,
    groups: int,
    linear_projection: bool,
    sample_size: int,
) -> Mapping[str, Any]:
    return _frozen(
        {
            "sample_size": sample_size,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": list(channels),
            "down_block_types": list(down),
            "up_block_types": list(up),
            "mid_block_type": mid,
            "layers_per_block": layers,
            "attention_head_dim": list(heads) if isinstance(heads, tuple) else heads,
            "cross_attention_dim": context,
            "norm_num_groups": groups,
            "norm_eps": 1e-5,
            "act_fn": "silu",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "use_linear_projection": linear_projection,
        }
    )


def _kl_vae(
    *, channels: tuple[int, ...], layers: int, groups: int, scaling: float, sample_size: int
) -> Mapping[str, Any]:
    return _frozen(
        {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * len(channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(channels),
            "block_out_channels": list(channels),
            "layers_per_block": layers,
            "latent_channels": 4,
            "norm_num_groups": groups,
            "scaling_factor": scaling,
            "sample_size": sample_size,
        }
    )


def _tiny_vae(*, channels: int, encoder_blocks: tuple[int, ...], decoder_blocks: tuple[int, ...]) -> Mapping[str, Any]:
    # TAESD layout (ANCHORS.md): latent_magnitude 3, latent_shift 0.5, scaling_factor 1.0.
    return _frozen(
        {
            "in_channels": 3,
            "out_channels": 3,
            "encoder_block_out_channels": [channels] * 4,
            "decoder_block_out_channels": [channels] * 4,
            "num_encoder_blocks": list(encoder_blocks),
            "num_decoder_blocks": list(decoder_blocks),
            "latent_channels": 4,
            "latent_magnitude": 3,
            "latent_shift": 0.5,
            "scaling_factor": 1.0,
            "upsampling_scaling_factor": 2,
            "act_fn": "relu",
        }
    )


def block_removed(teacher_unet: Mapping[str, Any]) -> Mapping[str, Any]:
    """SDXS / BK-SDM block removal as rules on a 4-stage SD-2.1-topology config (arXiv 2403.16627 Sec. 3.2):
    drop the mid block, the last down stage and the first up stage, the transformer blocks of the
    highest-resolution stage, and keep one resnet per down stage (two per up stage). On `sd21-base`
    this yields the released SDXS-512 layout."""
    t = dict(teacher_unet)
    heads = t["attention_head_dim"]
    down = ["DownBlock2D"] + list(t["down_block_types"][1:-1])
    up = list(t["up_block_types"][1:-1]) + ["UpBlock2D"]
    return _frozen(
        {
            **t,
            "block_out_channels": list(t["block_out_channels"][:-1]),
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": None,
            "layers_per_block": 1,
            "attention_head_dim": list(heads[:-1]) if isinstance(heads, (list, tuple)) else heads,
        }
    )


# Student parameter prefix -> teacher prefix for a block-removed student (weight init; data, not code).
# Up stages keep the first and last of the teacher's three resnets/attentions: their skip-connection
# channels are the ones the two-resnet student stage sees.
SDXS_LAYER_MAP = _frozen(
    {
        "conv_in": "conv_in",
        "time_embedding": "time_embedding",
        "conv_norm_out": "conv_norm_out",
        "conv_out": "conv_out",
        **{f"down_blocks.{i}.resnets.0": f"down_blocks.{i}.resnets.0" for i in range(3)},
        **{f"down_blocks.{i}.attentions.0": f"down_blocks.{i}.attentions.0" for i in (1, 2)},
        **{f"down_blocks.{i}.downsamplers.0": f"down_blocks.{i}.downsamplers.0" for i in (0, 1)},
        **{f"up_blocks.{i}.resnets.{j}": f"up_blocks.{i + 1}.resnets.{2 * j}" for i in range(3) for j in (0, 1)},
        **{f"up_blocks.{i}.attentions.{j}": f"up_blocks.{i + 1}.attentions.{2 * j}" for i in (0, 1) for j in (0, 1)},
        **{f"up_blocks.{i}.upsamplers.0": f"up_blocks.{i + 1}.upsamplers.0" for i in (0, 1)},
    }
)
# Feature-KD pairs (student block -> teacher block whose output it matches), after BK-SDM.
SDXS_FEATURE_PAIRS = _frozen(
    {
        **{f"down_blocks.{i}": f"down_blocks.{i}" for i in range(3)},
        **{f"up_blocks.{i}": f"up_blocks.{i + 1}" for i in range(3)},
    }
)

SD21_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD21_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
# SDXS-512 after block removal (ANCHORS.md): no last down / first up stage, no mid block, no
# transformer blocks at the highest resolution.
SDXS_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXS_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="sd21-base",
            summary="SD-2.1-base teacher layout: 0.87B U-Net, KL VAE, OpenCLIP-H-sized text encoder, 512x512",
            resolution=512,
            text_encoder=_clip_text(hidden=1024, layers=23, heads=16, intermediate=4096, projection=512, act="gelu"),
            unet=_unet(
                channels=(320, 640, 1280, 1280),
                down=SD21_DOWN,
                up=SD21_UP,
                mid="UNetMidBlock2DCrossAttn",
                layers=2,
                heads=(5, 10, 20, 20),
                context=1024,
                groups=32,
                linear_projection=True,
                sample_size=64,
            ),
            vae_class="AutoencoderKL",
            vae=_kl_vae(channels=(128, 256, 512, 512), layers=2, groups=32, scaling=0.18215, sample_size=512),
            pad_token="!",
            default_steps=25,
            default_guidance=7.5,
        ),
        ModelPreset(
            name="sdxs-512",
            summary="Released SDXS-512 layout: 0.32B block-removed U-Net, TAESD tiny decoder, CLIP ViT-L/14, 512x512",
            resolution=512,
            text_encoder=_clip_text(
                hidden=768, layers=12, heads=12, intermediate=3072, projection=768, act="quick_gelu"
            ),
            unet=_unet(
                channels=(320, 640, 1280),
                down=SDXS_DOWN,
                up=SDXS_UP,
                mid=None,
                layers=1,
                heads=8,
                context=768,
                groups=32,
                linear_projection=False,
                sample_size=64,
            ),
            vae_class="AutoencoderTiny",
            vae=_tiny_vae(channels=64, encoder_blocks=(1, 3, 3, 3), decoder_blocks=(3, 3, 3, 1)),
        ),
        ModelPreset(
            name="sdxs-512-0.9",
            summary="SDXS-512-0.9 layout: as sdxs-512 with an OpenCLIP-H text encoder (cross_attention_dim 1024)",
            resolution=512,
            text_encoder=_clip_text(hidden=1024, layers=23, heads=16, intermediate=4096, projection=512, act="gelu"),
            unet=_unet(
                channels=(320, 640, 1280),
                down=SDXS_DOWN,
                up=SDXS_UP,
                mid=None,
                layers=1,
                heads=8,
                context=1024,
                groups=32,
                linear_projection=False,
                sample_size=64,
            ),
            vae_class="AutoencoderTiny",
            vae=_tiny_vae(channels=64, encoder_blocks=(1, 3, 3, 3), decoder_blocks=(3, 3, 3, 1)),
            pad_token="!",
        ),
        ModelPreset(
            name="tiny",
            summary="Test-sized one-step layout: milliseconds on CPU, 64x64 images from 8x8 latents",
            resolution=64,
            text_encoder=_clip_text(hidden=16, layers=2, heads=2, intermediate=32, projection=16, act="quick_gelu"),
            unet=_unet(
                channels=(8, 16),
                down=("DownBlock2D", "CrossAttnDownBlock2D"),
                up=("CrossAttnUpBlock2D", "UpBlock2D"),
                mid=None,
                layers=1,
                heads=2,
                context=16,
                groups=2,
                linear_projection=False,
                sample_size=8,
            ),
            vae_class="AutoencoderTiny",
            vae=_tiny_vae(channels=8, encoder_blocks=(1, 1, 1, 1), decoder_blocks=(1, 1, 1, 1)),
        ),
        ModelPreset(
            name="tiny-teacher",
            summary="Test-sized SD-2.1 topology (4 stages, mid block, KL VAE) for multi-step and distillation tests",
            resolution=64,
            text_encoder=_clip_text(hidden=16, layers=2, heads=2, intermediate=32, projection=16, act="gelu"),
            unet=_unet(
                channels=(8, 16, 16, 16),
                down=SD21_DOWN,
                up=SD21_UP,
                mid="UNetMidBlock2DCrossAttn",
                layers=2,
                heads=(1, 2, 2, 2),
                context=16,
                groups=2,
                linear_projection=True,
                sample_size=8,
            ),
            vae_class="AutoencoderKL",
            vae=_kl_vae(channels=(8, 8, 8, 8), layers=1, groups=2, scaling=1.0, sample_size=64),
            pad_token="!",
            default_steps=4,
            default_guidance=3.0,
        ),
        ModelPreset(
            name="shapes-teacher",
            summary="SHAPES-64 teacher: SD-2.1 topology at toy width (4 stages, 2 resnets, mid block), KL VAE, 64x64",
            resolution=64,
            text_encoder=_clip_text(hidden=128, layers=2, heads=4, intermediate=512, projection=128, act="gelu"),
            unet=_unet(
                channels=(32, 64, 128, 128),
                down=SD21_DOWN,
                up=SD21_UP,
                mid="UNetMidBlock2DCrossAttn",
                layers=2,
                heads=(1, 2, 4, 4),
                context=128,
                groups=8,
                linear_projection=True,
                sample_size=8,
            ),
            vae_class="AutoencoderKL",
            vae=_kl_vae(channels=(32, 64, 64, 64), layers=1, groups=8, scaling=1.0, sample_size=64),
            pad_token="!",
            default_steps=25,
            default_guidance=2.5,
        ),
        ModelPreset(
            name="shapes",
            summary="SHAPES-64 one-step student: SDXS block-removed layout of shapes-teacher, tiny decoder, 64x64",
            resolution=64,
            text_encoder=_clip_text(hidden=128, layers=2, heads=4, intermediate=512, projection=128, act="gelu"),
            unet=block_removed(
                _unet(
                    channels=(32, 64, 128, 128),
                    down=SD21_DOWN,
                    up=SD21_UP,
                    mid="UNetMidBlock2DCrossAttn",
                    layers=2,
                    heads=(1, 2, 4, 4),
                    context=128,
                    groups=8,
                    linear_projection=True,
                    sample_size=8,
                )
            ),
            vae_class="AutoencoderTiny",
            vae=_tiny_vae(channels=16, encoder_blocks=(1, 1, 1, 1), decoder_blocks=(1, 1, 1, 1)),
            pad_token="!",
            layer_map=SDXS_LAYER_MAP,
            teacher="shapes-teacher",
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    """Look a preset up by name; the error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelLoadError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
