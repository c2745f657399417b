"""The SDXS inference rule as pure functions, in numpy terms so runtimes need no PyTorch.

SDXS runs `StableDiffusionPipeline(num_inference_steps=1, guidance_scale=0)` with EulerDiscrete and
"trailing" spacing (arXiv 2403.16627 Sec. 4; ANCHORS.md): one U-Net evaluation at t = 999. We follow
diffusers' EulerDiscreteScheduler to float precision so a checkpoint gives the same image here and in
diffusers:

    sigma   = sqrt((1 - abar_t) / abar_t)                 (about 14.61 at t = 999)
    x       = noise * sigma                                (init_noise_sigma of trailing spacing)
    x_in    = x / sqrt(sigma^2 + 1)                        (scale_model_input; the U-Net's input)
    x0      = x - sigma * eps                              (epsilon prediction)
            = x_in * ... (v prediction: x0 = -sigma / sqrt(sigma^2+1) * v + x / (sigma^2 + 1))
    one Euler step from sigma to 0 lands exactly on x0.

The returned latent is in the U-Net's (scaled) space; the decoder divides by the VAE's scaling factor.

Image-to-image (SDEdit, one step): strength S in (0, 1] selects t_S = round(S * T) - 1 on the trailing
schedule (S = 1 is t = 999, text-to-image); the encoded image z0 is noised as EulerDiscrete's
`add_noise` does, x = z0 + sigma_t * noise, and the same rule runs at t_S:

    x_in = x / sqrt(sigma_t^2 + 1),   x0 = rule(U-Net(x_in, t_S, context), x)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdxs_edge.errors import SDXSError


def alphas_cumprod(scheduler_config: Mapping[str, Any]) -> np.ndarray:
    """abar_t for t = 0..T-1, float32, as diffusers computes it (linear / scaled_linear betas)."""
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    b0, b1 = float(scheduler_config.get("beta_start", 0.00085)), float(scheduler_config.get("beta_end", 0.012))
    kind = scheduler_config.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float32) ** 2
    elif kind == "linear":
        betas = np.linspace(b0, b1, n, dtype=np.float32)
    else:
        raise SDXSError(f"unsupported beta_schedule {kind!r} (supported: scaled_linear, linear)")
    return np.cumprod(1.0 - betas, dtype=np.float32)


@dataclass(frozen=True)
class OneStepConstants:
    """What a runtime needs to run the SDXS one-step rule; stored in every bundle's manifest.

    Args:
        timestep: the single U-Net timestep (T - 1 = 999 with trailing spacing).
        sigma: Euler sigma at that timestep.
        input_scale: x_in = noise * input_scale (= sigma / sqrt(sigma^2 + 1)).
        prediction_type: "epsilon" or "v_prediction".
        latent_scaling: the VAE's scaling_factor; the decoder gets latent / latent_scaling.
    """

    timestep: int
    sigma: float
    input_scale: float
    prediction_type: str
    latent_scaling: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def strength_timestep(strength: float, num_train_timesteps: int = 1000) -> int:
    """The trailing-schedule timestep image-to-image strength `strength` in (0, 1] selects: round(S * T) - 1."""
    s = float(strength)
    if not 0.0 < s <= 1.0:
        raise SDXSError(f"strength must be in (0, 1], got {strength!r}")
    return max(int(round(s * num_train_timesteps)) - 1, 0)


def one_step_constants(
    scheduler_config: Mapping[str, Any], latent_scaling: float, timestep: int | None = None
) -> OneStepConstants:
    """Constants of the one-step rule for a scheduler config at `timestep` (default: trailing t = T - 1).

    Args:
        scheduler_config: the model's scheduler config.
        latent_scaling: the VAE's scaling factor.
        timestep: the U-Net timestep (image-to-image: `strength_timestep`).
    """
    acp = alphas_cumprod(scheduler_config)
    t = len(acp) - 1 if timestep is None else int(timestep)
    if not 0 <= t < len(acp):
        raise SDXSError(f"timestep must be in [0, {len(acp) - 1}], got {timestep}")
    sigma = np.float32(((1 - acp[t]) / acp[t]) ** 0.5)
    pt = scheduler_config.get("prediction_type", "epsilon")
    if pt not in ("epsilon", "v_prediction"):
        raise SDXSError(f"unsupported prediction_type {pt!r} (supported: epsilon, v_prediction)")
    return OneStepConstants(t, float(sigma), float(sigma / np.sqrt(sigma**2 + 1)), pt, float(latent_scaling))


def initial_latent(noise, c: OneStepConstants, init=None):
    """U-Net input x_in from unit Gaussian noise (plus, for image-to-image, the encoded image `init`)."""
    if init is None:
        return noise * np.float32(c.input_scale)
    return (init + noise * np.float32(c.sigma)) * np.float32(1.0 / (c.sigma**2 + 1) ** 0.5)


def denoised(model_output, noise, c: OneStepConstants, init=None):
    """x0 from the U-Net output at t = c.timestep for input `initial_latent(noise, c, init)`.

    Works on numpy arrays and torch tensors alike (plain arithmetic).
    """
    sigma = np.float32(c.sigma)
    x = noise * sigma if init is None else init + noise * sigma
    if c.prediction_type == "epsilon":
        return x - sigma * model_output
    return model_output * np.float32(-sigma / (sigma**2 + 1) ** 0.5) + x / np.float32(sigma**2 + 1)


def sample_one_step(denoise: Callable[[Any, int, Any], Any], noise, context, c: OneStepConstants, init=None):
    """The SDXS one-step sampler: x0 = rule(denoise(x_in, t, context)).

    Args:
        denoise: the U-Net, `denoise(x_in, timestep, context) -> model output`.
        noise: unit Gaussian latent, (B, 4, h, w).
        context: text-encoder hidden states, (B, 77, D).
        c: the one-step constants (image-to-image: at `strength_timestep`).
        init: image-to-image: the encoded image in the U-Net's space, (B, 4, h, w); None for text-to-image.

    Returns:
        the predicted clean latent in the U-Net's space (divide by c.latent_scaling before decoding).
    """
    return denoised(denoise(initial_latent(noise, c, init), c.timestep, context), noise, c, init)
