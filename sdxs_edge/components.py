"""Exportable component wrappers: plain tensors in, plain tensors out, with a declared I/O spec.

Every converter lowers these modules and every runtime runs them, so the contract between PyTorch,
ONNX, ExecuTorch and Core ML lives here (after executorch's examples/models/model_base.py). The U-Net
wrapper bakes in the one-step timestep (t = 999, arXiv 2403.16627 Sec. 4): a one-step deployment never
feeds another. The decoder wrapper divides by the VAE's latent scaling itself, so a runtime passes the
sampler's x0 straight through.

With a ControlNet (arXiv 2302.05543) the bundle holds four components, run in `COMPONENTS` order: the
ControlNet wrapper reads (latent, context, control image) at the same baked timestep and returns one
named residual per U-Net skip (`down_res_0` .. `down_res_{N-1}`) plus `mid_res` for the bottleneck, each
already multiplied by the conditioning scale; the U-Net wrapper then takes those residuals as extra
inputs, by the same names, after latent and context.

With an encoder (image-to-image, one step at the timestep the strength selects; `sdxs_edge.sampler`)
the bundle holds the VAE's encoder as an "encoder" component, image (B, 3, H, W) in [-1, 1] -> latent
in the U-Net's space (`pipeline.encode_latents`), and its U-Net takes the timestep as a third input,
float32 (B,), instead of baking it in: text-to-image feeds t = 999, image-to-image t_S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdxs_edge.errors import SDXSError
from sdxs_edge.pipeline import SDXSPipeline

COMPONENTS = ("encoder", "text_encoder", "controlnet", "unet", "decoder")  # run order; encoder, controlnet optional
MID_RESIDUAL = "mid_res"
TIMESTEP = "timestep"  # the U-Net's third input in a bundle with an encoder


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: static shape and dtype name ("float32", "int32")."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


class TextEncoder(torch.nn.Module):
    """input_ids int32 (B, 77) -> hidden_states float32 (B, 77, D) (CLIP last hidden state, as SD uses)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.long())[0]


class UNet(torch.nn.Module):
    """(latent (B, 4, h, w), context (B, 77, D)) -> model output (B, 4, h, w) at a fixed timestep."""

    def __init__(self, unet, timestep: int):
        super().__init__()
        self.unet = unet
        self.register_buffer("timestep", torch.tensor([float(timestep)]), persistent=False)

    def forward(self, latent: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(latent, self.timestep.expand(latent.shape[0]), context).sample


class TimedUNet(torch.nn.Module):
    """(latent (B, 4, h, w), context (B, 77, D), timestep float32 (B,)) -> model output (B, 4, h, w): the
    U-Net of a bundle with an encoder, run at t = 999 for text-to-image and at t_S for image-to-image."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, latent: torch.Tensor, context: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(latent, timestep, context).sample


class Encoder(torch.nn.Module):
    """image float32 (B, 3, H, W) in [-1, 1] -> latent (B, 4, h, w) in the U-Net's space."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from sdxs_edge.pipeline import encode_latents

        return encode_latents(self.vae, image)


class ControlledUNet(UNet):
    """(latent, context, down_res_0 .. down_res_{N-1}, mid_res) -> model output: the U-Net adding a
    ControlNet's residuals to its skip connections and bottleneck (diffusers'
    `down_block_additional_residuals` / `mid_block_additional_residual`)."""

    def forward(self, latent: torch.Tensor, context: torch.Tensor, *residuals: torch.Tensor) -> torch.Tensor:
        t = self.timestep.expand(latent.shape[0])
        return self.unet(
            latent,
            t,
            context,
            down_block_additional_residuals=list(residuals[:-1]),
            mid_block_additional_residual=residuals[-1],
        ).sample


class ControlNet(torch.nn.Module):
    """(latent (B, 4, h, w), context (B, 77, D), control (B, 3, H, W) in [0, 1]) -> (down_res_0, ..,
    mid_res) at the fixed one-step timestep, scaled by `scale` (diffusers' `conditioning_scale`)."""

    def __init__(self, controlnet, timestep: int, scale: float = 1.0):
        super().__init__()
        self.controlnet = controlnet
        self.scale = float(scale)
        self.register_buffer("timestep", torch.tensor([float(timestep)]), persistent=False)

    def forward(self, latent: torch.Tensor, context: torch.Tensor, control: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = self.timestep.expand(latent.shape[0])
        down, mid = self.controlnet(latent, t, context, control, conditioning_scale=self.scale, return_dict=False)
        return (*down, mid)


class Decoder(torch.nn.Module):
    """latent (B, 4, h, w) in the U-Net's space -> image float32 (B, 3, H, W) in [-1, 1]."""

    def __init__(self, vae, latent_scaling: float):
        super().__init__()
        self.vae = vae
        self.latent_scaling = float(latent_scaling)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.latent_scaling).sample


def wrappers(
    pipe: SDXSPipeline, controlnet=None, control_scale: float = 1.0, encoder: bool = False
) -> dict[str, torch.nn.Module]:
    """The exportable modules of a loaded pipeline, in eval mode and `COMPONENTS` order.

    Args:
        pipe: the loaded pipeline.
        controlnet: a diffusers `ControlNetModel` built for `pipe`'s U-Net (checked), or None; with one,
            the result holds a "controlnet" module and a U-Net that takes its residuals.
        control_scale: the ControlNet's conditioning scale, baked into its module.
        encoder: add the VAE's encoder ("encoder") and take the U-Net's timestep as an input
            (image-to-image); not with a ControlNet.
    """
    c = pipe.one_step_constants()
    mods: dict[str, torch.nn.Module] = {}
    if encoder:
        if controlnet is not None:
            raise SDXSError("an encoder component (image-to-image) and a ControlNet in one bundle are not supported")
        mods["encoder"] = Encoder(pipe.c.vae).eval()
    mods["text_encoder"] = TextEncoder(pipe.c.text_encoder).eval()
    if encoder:
        mods["unet"] = TimedUNet(pipe.c.unet).eval()
    elif controlnet is not None:
        from sdxs_edge.controlnet import check_controlnet

        check_controlnet(controlnet, pipe.c.unet)
        mods["controlnet"] = ControlNet(controlnet, c.timestep, control_scale).eval()
        mods["unet"] = ControlledUNet(pipe.c.unet, c.timestep).eval()
    else:
        mods["unet"] = UNet(pipe.c.unet, c.timestep).eval()
    mods["decoder"] = Decoder(pipe.c.vae, c.latent_scaling).eval()
    return mods


def residual_specs(controlnet, batch: int, latent_size: int) -> list[TensorSpec]:
    """The ControlNet's residual outputs (= the controlled U-Net's extra inputs), from its config alone.

    diffusers' ControlNet has one zero convolution per down-path feature the U-Net keeps as a skip: the
    conv_in output, each resnet output of every down block, each down block's downsampler output (all
    but the last block), then one for the mid block at the bottleneck.

    Args:
        controlnet: a diffusers `ControlNetModel`.
        batch: static batch size.
        latent_size: latent side (resolution // 8).
    """
    cfg = controlnet.config
    ch = list(cfg.block_out_channels)
    shapes = [(ch[0], latent_size)]
    side = latent_size
    for i, c in enumerate(ch):
        shapes += [(c, side)] * int(cfg.layers_per_block)
        if i < len(ch) - 1:
            side = -(-side // 2)  # stride-2 conv with padding 1
            shapes.append((c, side))
    specs = [TensorSpec(f"down_res_{i}", (batch, c, s, s), "float32") for i, (c, s) in enumerate(shapes)]
    return specs + [TensorSpec(MID_RESIDUAL, (batch, ch[-1], side, side), "float32")]


def io_specs(
    pipe: SDXSPipeline,
    batch: int = 1,
    resolution: int | None = None,
    controlnet=None,
    encoder: bool = False,
    size=None,
) -> dict[str, tuple[list[TensorSpec], list[TensorSpec]]]:
    """Static input/output specs per component for a batch size and image resolution.

    Args:
        pipe: the loaded pipeline.
        batch: static batch size.
        resolution: image side in pixels (default: the model's).
        controlnet: a diffusers `ControlNetModel`, or None; with one, a "controlnet" entry is added and
            the U-Net takes its residuals after latent and context.
        encoder: add an "encoder" entry (image -> latent) and a "timestep" input to the U-Net.
        size: (width, height) in pixels instead of a square `resolution` (no ControlNet).
    """
    res = resolution or pipe.resolution
    width, height = size or (res, res)
    if width % 8 or height % 8:
        raise SDXSError(f"image width and height must be multiples of 8, got {width}x{height}")
    h, w = height // 8, width // 8
    d = pipe.c.text_encoder.config.hidden_size
    L = pipe.c.tokenizer.model_max_length
    lat = TensorSpec("latent", (batch, 4, h, w), "float32")
    ctx = TensorSpec("context", (batch, L, d), "float32")
    image = TensorSpec("image", (batch, 3, height, width), "float32")
    specs: dict[str, tuple[list[TensorSpec], list[TensorSpec]]] = {}
    if encoder:
        specs["encoder"] = ([image], [lat])
    specs |= {
        "text_encoder": (
            [TensorSpec("input_ids", (batch, L), "int32")],
            [TensorSpec("hidden_states", (batch, L, d), "float32")],
        ),
    }
    residuals: list[TensorSpec] = []
    if controlnet is not None:
        residuals = residual_specs(controlnet, batch, h)
        specs["controlnet"] = ([lat, ctx, TensorSpec("control", (batch, 3, res, res), "float32")], residuals)
    if encoder:
        residuals = [TensorSpec(TIMESTEP, (batch,), "float32")]
    specs["unet"] = ([lat, ctx, *residuals], [TensorSpec("noise_pred", (batch, 4, h, w), "float32")])
    specs["decoder"] = ([lat], [image])
    return specs


def example_inputs(
    pipe: SDXSPipeline,
    component: str,
    batch: int = 1,
    resolution: int | None = None,
    seed: int = 0,
    controlnet=None,
    encoder: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Deterministic example inputs matching `io_specs` (real token ids of a prompt for the text encoder;
    for the ControlNet, canny edges of a SHAPES-64 render of that prompt's scene as the control image).

    Args:
        pipe: the loaded pipeline.
        component: a key of `io_specs(...)`.
        batch: static batch size.
        resolution: image side in pixels (default: the model's).
        seed: seed of the random tensors (and of the control image's scene).
        controlnet: the ControlNet, for the "controlnet" component and the U-Net that takes its residuals.
        encoder: the specs of a bundle with an encoder (`io_specs`).
    """
    specs = io_specs(pipe, batch, resolution, controlnet, encoder)
    if component not in specs:
        raise SDXSError(f"no component {component!r} here (components: {', '.join(specs)})")
    ins, _ = specs[component]
    prompt = "a large cyan triangle at the bottom left on a black background"
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in ins:
        if spec.dtype == "int32":
            out.append(pipe.tokenize([prompt] * batch).int())
        elif spec.name == TIMESTEP:
            out.append(torch.full(spec.shape, float(pipe.one_step_constants().timestep)))
        elif spec.name == "image":
            out.append(torch.rand(spec.shape, generator=g) * 2 - 1)
        elif spec.name == "control":
            from sdxs_edge.control import prompt_controls

            out.append(torch.from_numpy(prompt_controls([prompt] * batch, spec.shape[-1], seed)))
        else:
            out.append(torch.randn(spec.shape, generator=g))
    return tuple(out)
