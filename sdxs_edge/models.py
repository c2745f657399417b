"""Build the field's classes from a preset: diffusers U-Net / VAEs, transformers CLIP text encoder.

Heavy libraries are imported inside functions so `import sdxs_edge` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdxs_edge.presets import ModelPreset


@dataclass
class Components:
    """The modules of a Stable-Diffusion-style text-to-image model (no safety checker, no image encoder)."""

    tokenizer: Any  # transformers.CLIPTokenizer
    text_encoder: Any  # transformers.CLIPTextModel
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL or AutoencoderTiny
    scheduler_config: dict

    def modules(self) -> dict[str, Any]:
        """The three network components by their folder names."""
        return {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}


def build_text_encoder(preset: ModelPreset):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**preset.text_encoder)).eval()


def build_unet(preset: ModelPreset, **overrides):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**preset.unet, **overrides}).eval()


def build_vae(preset: ModelPreset):
    import diffusers

    return getattr(diffusers, preset.vae_class)(**preset.vae).eval()


def build_components(preset: ModelPreset, seed: int = 0) -> Components:
    """Random-init components of `preset` (seconds, even for the 0.87B sd21-base U-Net).

    Args:
        preset: the architecture.
        seed: torch seed for the random weights, so two builds are identical.
    """
    import tempfile

    import torch

    from sdxs_edge.tokenizer import load_clip_tokenizer, write_clip_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = build_text_encoder(preset)
        unet = build_unet(preset)
        vae = build_vae(preset)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_clip_tokenizer(write_clip_tokenizer(tmp, pad_token=preset.pad_token))
    return Components(tokenizer, text_encoder, unet, vae, dict(preset.scheduler))


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
