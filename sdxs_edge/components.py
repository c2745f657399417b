"""Exportable component wrappers: plain tensors in, plain tensors out, with a declared I/O spec.

Every converter lowers these three modules and every runtime runs them, so the contract between
PyTorch, ONNX, ExecuTorch and Core ML lives here (after executorch's examples/models/model_base.py).
The U-Net wrapper bakes in the one-step timestep (t = 999, arXiv 2403.16627 Sec. 4): a one-step
deployment never feeds another. The decoder wrapper divides by the VAE's latent scaling itself, so a
runtime passes the sampler's x0 straight through.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sdxs_edge.errors import SDXSError
from sdxs_edge.pipeline import SDXSPipeline

COMPONENTS = ("text_encoder", "unet", "decoder")


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


class Decoder(torch.nn.Module):
    """latent (B, 4, h, w) in the U-Net's space -> image float32 (B, 3, H, W) in [-1, 1]."""

    def __init__(self, vae, latent_scaling: float):
        super().__init__()
        self.vae = vae
        self.latent_scaling = float(latent_scaling)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.latent_scaling).sample


def wrappers(pipe: SDXSPipeline) -> dict[str, torch.nn.Module]:
    """The three exportable modules of a loaded pipeline, in eval mode."""
    c = pipe.one_step_constants()
    return {
        "text_encoder": TextEncoder(pipe.c.text_encoder).eval(),
        "unet": UNet(pipe.c.unet, c.timestep).eval(),
        "decoder": Decoder(pipe.c.vae, c.latent_scaling).eval(),
    }


def io_specs(pipe: SDXSPipeline, batch: int = 1, resolution: int | None = None) -> dict[str, tuple[list[TensorSpec], list[TensorSpec]]]:
    """Static input/output specs per component for a batch size and image resolution."""
    res = resolution or pipe.resolution
    if res % 8:
        raise SDXSError(f"resolution must be a multiple of 8, got {res}")
    h = res // 8
    d = pipe.c.text_encoder.config.hidden_size
    L = pipe.c.tokenizer.model_max_length
    lat = TensorSpec("latent", (batch, 4, h, h), "float32")
    return {
        "text_encoder": ([TensorSpec("input_ids", (batch, L), "int32")], [TensorSpec("hidden_states", (batch, L, d), "float32")]),
        "unet": ([lat, TensorSpec("context", (batch, L, d), "float32")], [TensorSpec("noise_pred", (batch, 4, h, h), "float32")]),
        "decoder": ([lat], [TensorSpec("image", (batch, 3, res, res), "float32")]),
    }


def example_inputs(pipe: SDXSPipeline, component: str, batch: int = 1, resolution: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic example inputs matching `io_specs` (real token ids of a prompt for the text encoder)."""
    ins, _ = io_specs(pipe, batch, resolution)[component]
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in ins:
        if spec.dtype == "int32":
            out.append(pipe.tokenize(["a large cyan triangle at the bottom left on a black background"] * batch).int())
        else:
            out.append(torch.randn(spec.shape, generator=g))
    return tuple(out)
