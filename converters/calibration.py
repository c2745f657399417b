"""Inputs for calibration and parity: real pipeline tensors captured per component.

int8 ranges must come from what each component sees in a real one-step generation (arXiv 2403.16627
Sec. 4: one U-Net call at t = 999), not from random tensors: the text encoder sees token ids of real
prompts, the U-Net sees x_in = initial_latent(noise) with the prompt's context, and the decoder sees the
sampler's x0. `capture` runs the PyTorch wrappers once over (prompt, seed) pairs and keeps every
component's inputs and outputs.

With a ControlNet, each sample also needs a control image. There is no edge map to go with a prompt, so
one is made from the prompt: canny edges of a SHAPES-64 render of the prompt's scene, or, for a prompt
that is not a SHAPES-64 caption, of a random SHAPES-64 scene (`sdxs_edge.control.prompt_controls`, seeded
by the sample's seed). The ControlNet sees (x_in, context, control), the U-Net its residuals.

With an encoder (image-to-image), each sample also feeds the encoder the PyTorch decoder's image of that
sample, and adds a second U-Net (and decoder) sample: that image encoded, noised with another seed to the
timestep of a strength from `IMG2IMG_STRENGTHS` (cycled), as `sdxs_edge.sampler` runs image-to-image;
the U-Net's timestep input is 999 for the text-to-image samples and t_S for these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdxs_edge.errors import SDXSError


class CalibrationError(SDXSError):
    """Calibration prompts are missing, empty or unreadable."""


# Parity uses prompts and seeds the calibration never saw, so int8 ranges are judged on unseen inputs.
PARITY_PROMPTS = (
    "a large cyan triangle at the bottom left on a black background",
    "a small orange cross at the top right on a white background",
)
PARITY_SEED0 = 1000


DEFAULT_CAPTIONS = 32  # SHAPES-64 captions int8 calibrates on unless told otherwise
IMG2IMG_STRENGTHS = (0.3, 0.5, 0.7, 0.9)  # image-to-image samples of a bundle with an encoder, cycled
IMG2IMG_SEED_OFFSET = 7919  # their noise seed: the sample's seed plus this


def default_calibration_prompts(n: int = DEFAULT_CAPTIONS) -> list[str]:
    """`n` distinct SHAPES-64 captions with every size, shape and background crossed and the colours and
    positions spread evenly: the 16 (size, shape, background) cells are taken in turn, and each takes the
    unused colour and position pair whose colour and position have been used least so far (ties: a fixed
    shuffle, seed 0). The default 32 hold two captions of each cell and every colour four times.

    A stride through the grammar's nested order (the former scheme) aliased the attributes: every 37th of
    the 1152 captions held only small circles and triangles and large squares and crosses, and no cross on
    white; a U-Net with the outline LoRA calibrated on them scored 20.6 dB on a small cross on white."""
    from collections import Counter
    from itertools import product

    from sdxs_edge import shapes

    a, total = shapes.ATTRIBUTES, len(shapes.all_captions())
    if not 1 <= n <= total:
        raise CalibrationError(f"calibration caption count must be 1 to {total}, got {n}")
    cells = list(product(a["size"], a["shape"], a["background"]))
    pairs = list(product(a["color"], a["position"]))
    rng = np.random.default_rng(0)
    free = [[pairs[k] for k in rng.permutation(len(pairs))] for _ in cells]
    colors, positions, out = Counter(), Counter(), []
    for i in range(n):
        size, shape, background = cells[i % len(cells)]
        left = free[i % len(cells)]
        color, position = left.pop(min(range(len(left)), key=lambda k: (colors[left[k][0]], positions[left[k][1]])))
        colors[color] += 1
        positions[position] += 1
        out.append(shapes.caption(size, color, shape, position, background))
    return out


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines are skipped.

    Args:
        path: the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration prompts file {path} does not exist")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise CalibrationError(
            f"calibration prompts file {path} is not a text file (it contains NUL bytes); give one prompt per line"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(
            f"calibration prompts file {path} is not UTF-8 text (byte {e.start}); give one prompt per line"
        ) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CalibrationError(f"calibration prompts file {path} has no prompts; give one prompt per line")
    return prompts


def resolve_prompts(prompts: str | Path | Sequence[str] | None) -> list[str]:
    """None -> the default 32 SHAPES-64 captions; an int n -> n of them; a path -> its lines; a list ->
    itself (must be non-empty)."""
    if prompts is None:
        return default_calibration_prompts()
    if isinstance(prompts, int) and not isinstance(prompts, bool):
        return default_calibration_prompts(prompts)
    if isinstance(prompts, (str, Path)):
        return read_prompts(prompts)
    out = [str(p) for p in prompts if str(p).strip()]
    if not out:
        raise CalibrationError("calibration prompts are empty; give at least one prompt")
    return out


@dataclass(frozen=True)
class Captured:
    """Per-component input tuples (numpy) and the final images of a PyTorch one-step run.

    Args:
        inputs: component name -> list of input tuples, each matching the component's io spec.
        outputs: component name -> list of PyTorch outputs for those inputs (the reference).
        noise: the unit Gaussian latents, one per sample, for the sampler rule.
        images: uint8 images (B, H, W, 3) per sample from the PyTorch decoder.
        controls: the control images (B, 3, H, W) in [0, 1] per sample (empty without a ControlNet).
    """

    inputs: dict[str, list[tuple[np.ndarray, ...]]]
    outputs: dict[str, list]  # one array per sample; a tuple of arrays for the ControlNet's residuals
    noise: list[np.ndarray]
    images: list[np.ndarray]
    controls: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.noise)


def to_uint8(images) -> np.ndarray:
    """Decoder output in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), rounded as `pipeline.to_pil` does."""
    arr = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return (arr * 255).round().astype(np.uint8)


NOISE_RNG = "torch"  # `noise` below, by its `runtimes.base.RNGS` name


def noise(batch: int, latent_size: int | tuple[int, int], seed: int) -> np.ndarray:
    """Unit Gaussian latents as `SDXSPipeline.noise` draws them, at any latent size (side, or (h, w))."""
    import torch

    h, w = latent_size if isinstance(latent_size, tuple) else (latent_size, latent_size)
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((batch, 4, h, w), generator=g, dtype=torch.float32).numpy()


def merge(parts: Sequence[Captured]) -> Captured:
    """Several captures (one per image size) as one, samples in order."""
    if len(parts) == 1:
        return parts[0]
    keys = parts[0].inputs
    return Captured(
        {k: [x for p in parts for x in p.inputs[k]] for k in keys},
        {k: [x for p in parts for x in p.outputs[k]] for k in keys},
        [x for p in parts for x in p.noise],
        [x for p in parts for x in p.images],
        [x for p in parts for x in p.controls],
    )


def capture(
    pipe,
    modules: dict,
    prompts: Sequence[str],
    seed0: int,
    batch: int = 1,
    resolution: int | None = None,
    size: tuple[int, int] | None = None,
) -> Captured:
    """Run the one-step pipeline with the PyTorch wrappers and keep every component's inputs and outputs.

    Args:
        pipe: the loaded `SDXSPipeline`.
        modules: `sdxs_edge.components.wrappers(pipe)` (with a "controlnet" module, the control images are
            made from the prompts, see the module docstring).
        prompts: one sample per `batch` prompts (the list is cycled to a multiple of `batch`).
        seed0: noise seed of the first sample; sample i uses seed0 + i (and control scene seed seed0 + i).
        batch: batch size of every tensor (the bundle's static batch).
        resolution: image side in pixels (default: the model's).
        size: (width, height) in pixels instead of a square `resolution`.
    """
    import torch

    from sdxs_edge import sampler
    from sdxs_edge.control import prompt_controls

    c = pipe.one_step_constants()
    res = resolution or pipe.resolution
    width, height = size or (res, res)
    prompts = list(prompts)
    n = -(-len(prompts) // batch)
    prompts = [prompts[i % len(prompts)] for i in range(n * batch)]
    ins: dict[str, list] = {k: [] for k in modules}
    outs: dict[str, list] = {k: [] for k in modules}
    noises, images, controls = [], [], []
    with torch.no_grad():
        for i in range(n):
            chunk = prompts[i * batch : (i + 1) * batch]
            ids = pipe.tokenize(chunk).to(torch.int32)
            ctx = modules["text_encoder"](ids)
            z = noise(batch, (height // 8, width // 8), seed0 + i)
            x_in = torch.from_numpy(sampler.initial_latent(z, c))
            residuals: tuple = ()
            if "controlnet" in modules:
                control = torch.from_numpy(prompt_controls(chunk, res, seed0 + i))
                residuals = tuple(modules["controlnet"](x_in, ctx, control))
                ins["controlnet"].append((x_in.numpy(), ctx.numpy(), control.numpy()))
                outs["controlnet"].append(tuple(r.numpy() for r in residuals))
                controls.append(control.numpy())
            if "encoder" in modules:
                residuals = (torch.full((batch,), float(c.timestep)),)  # the timestep input, t = 999
            eps = modules["unet"](x_in, ctx, *residuals)
            x0 = sampler.denoised(eps, torch.from_numpy(z), c).float()
            img = modules["decoder"](x0)
            ins["text_encoder"].append((ids.numpy(),))
            ins["unet"].append((x_in.numpy(), ctx.numpy(), *(r.numpy() for r in residuals)))
            ins["decoder"].append((x0.numpy(),))
            outs["text_encoder"].append(ctx.numpy())
            outs["unet"].append(eps.numpy())
            outs["decoder"].append(img.numpy())
            noises.append(z)
            images.append(to_uint8(img.numpy()))
            if "encoder" in modules:
                _img2img_sample(pipe, modules, ins, outs, img.clamp(-1, 1), ctx, seed0 + i, i)
    return Captured(ins, outs, noises, images, controls)


def _img2img_sample(pipe, modules: dict, ins: dict, outs: dict, image, ctx, seed: int, i: int) -> None:
    """Encoder, U-Net and decoder samples of one image-to-image step from `image` (see the module docstring)."""
    import torch

    from sdxs_edge import sampler

    t = sampler.strength_timestep(IMG2IMG_STRENGTHS[i % len(IMG2IMG_STRENGTHS)])
    c = sampler.one_step_constants(pipe.c.scheduler_config, pipe.latent_scaling, t)
    init = modules["encoder"](image)
    z = torch.from_numpy(noise(image.shape[0], tuple(init.shape[-2:]), seed + IMG2IMG_SEED_OFFSET))
    x_in = sampler.initial_latent(z, c, init).float()
    ts = torch.full((image.shape[0],), float(t))
    eps = modules["unet"](x_in, ctx, ts)
    x0 = sampler.denoised(eps, z, c, init).float()
    for name, args, out in (
        ("encoder", (image,), init),
        ("unet", (x_in, ctx, ts), eps),
        ("decoder", (x0,), modules["decoder"](x0)),
    ):
        ins[name].append(tuple(a.numpy() for a in args))
        outs[name].append(out.numpy())
