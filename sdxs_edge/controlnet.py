"""ControlNets for our U-Nets: build one for a U-Net, check that one fits, load and save (safetensors).

A ControlNet here is diffusers' `ControlNetModel`: a trainable copy of the U-Net's encoder that reads a
control image and returns one residual per down-block output plus one for the bottleneck, which the
U-Net adds to its skip connections (`down_block_additional_residuals`, `mid_block_additional_residual`).
SDXS-layout U-Nets have no mid block; their ControlNet keeps a plain ResNet mid block (no attention),
whose residual the U-Net adds to its bottleneck features, as diffusers' U-Net does for any U-Net.

A ControlNet folder is what `ControlNetModel.save_pretrained` writes (config.json +
diffusion_pytorch_model.safetensors), so diffusers loads ours and we load diffusers'.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from sdxs_edge.errors import ModelLoadError, SDXSError

WEIGHTS = "diffusion_pytorch_model.safetensors"
SHAPES_EMBEDDING = (16, 32, 64, 128)  # conditioning-embedding widths for 64x64 images (SD uses 16-32-96-256)


class ControlNetMismatchError(SDXSError):
    """A ControlNet was built for another U-Net (its residuals would not fit this U-Net's skips)."""


def controlnet_for_unet(
    unet, conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256), load_weights_from_unet: bool = True
):
    """A `ControlNetModel` shaped for `unet`, initialised from its encoder (conv_in, time embedding,
    down blocks, and mid block where the U-Net has one); zero convolutions start at zero, so the U-Net's
    output is unchanged until the ControlNet is trained.

    Args:
        unet: a diffusers `UNet2DConditionModel`.
        conditioning_embedding_out_channels: widths of the control-image encoder; its len - 1 stride-2 convs
            must bring the image to the latent size (3 for the VAE's 8x).
        load_weights_from_unet: copy the matching encoder weights (else random init).
    """
    import torch
    from diffusers import ControlNetModel

    c = unet.config
    mid = c.mid_block_type or "UNetMidBlock2D"
    if mid not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
        raise SDXSError(f"no ControlNet mid block for a U-Net with mid_block_type {c.mid_block_type!r}")
    cn = ControlNetModel(
        in_channels=c.in_channels,
        conditioning_channels=3,
        flip_sin_to_cos=c.flip_sin_to_cos,
        freq_shift=c.freq_shift,
        down_block_types=tuple(c.down_block_types),
        only_cross_attention=c.only_cross_attention,
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        downsample_padding=c.downsample_padding,
        mid_block_scale_factor=c.mid_block_scale_factor,
        act_fn=c.act_fn,
        norm_num_groups=c.norm_num_groups,
        norm_eps=c.norm_eps,
        cross_attention_dim=c.cross_attention_dim,
        transformer_layers_per_block=c.transformer_layers_per_block,
        attention_head_dim=c.attention_head_dim,
        num_attention_heads=c.num_attention_heads,
        use_linear_projection=c.use_linear_projection,
        upcast_attention=c.upcast_attention,
        resnet_time_scale_shift=c.resnet_time_scale_shift,
        conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        mid_block_type=mid,
    )
    if load_weights_from_unet:
        with torch.no_grad():
            cn.conv_in.load_state_dict(unet.conv_in.state_dict())
            cn.time_proj.load_state_dict(unet.time_proj.state_dict())
            cn.time_embedding.load_state_dict(unet.time_embedding.state_dict())
            cn.down_blocks.load_state_dict(unet.down_blocks.state_dict())
            if unet.mid_block is not None and c.mid_block_type == mid:
                cn.mid_block.load_state_dict(unet.mid_block.state_dict())
    return cn.eval()


def check_controlnet(controlnet, unet) -> None:
    """Raise ControlNetMismatchError unless `controlnet` produces residuals this U-Net can take."""
    a, b = controlnet.config, unet.config
    checks = [
        ("block_out_channels", list(a.block_out_channels), list(b.block_out_channels)),
        ("down_block_types", list(a.down_block_types), list(b.down_block_types)),
        ("layers_per_block", a.layers_per_block, b.layers_per_block),
        ("in_channels", a.in_channels, b.in_channels),
        ("cross_attention_dim", a.cross_attention_dim, b.cross_attention_dim),
    ]
    for name, got, want in checks:
        if got != want:
            raise ControlNetMismatchError(
                f"the ControlNet was built for another U-Net: {name} {got} vs the U-Net's {want}"
            )


def load_controlnet(path: str | os.PathLike, unet=None):
    """Load a ControlNet folder (config.json + safetensors weights); with `unet`, check it fits.

    Args:
        path: the folder `ControlNetModel.save_pretrained` wrote.
        unet: the U-Net it must feed (optional).
    """
    import torch
    from diffusers import ControlNetModel

    from sdxs_edge.weights import check_safetensors

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"ControlNet {p} is not a folder (expected config.json + {WEIGHTS})")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"ControlNet folder {p} has no config.json")
    f = p / WEIGHTS
    if not f.is_file():
        bins = [q.name for q in p.glob("*.bin")]
        hint = f" (found {', '.join(bins)}: pickled weights are refused, convert them to safetensors)" if bins else ""
        raise ModelLoadError(f"{f} is missing{hint}")
    check_safetensors(f)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cn = ControlNetModel.from_pretrained(p, use_safetensors=True, torch_dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load the ControlNet {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if unet is not None:
        check_controlnet(cn, unet)
    return cn.eval()


def save_controlnet(controlnet, folder: str | os.PathLike, overwrite: bool = False, dtype=None) -> Path:
    """Write a ControlNet folder (safetensors), atomically; `dtype` e.g. torch.float16 halves the size."""
    import copy

    from sdxs_edge.atomic import atomic_dir

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise SDXSError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_dir(folder, overwrite=True) as tmp:
        m = copy.deepcopy(controlnet).to(dtype) if dtype is not None else controlnet
        m.save_pretrained(tmp, safe_serialization=True)
    return folder
