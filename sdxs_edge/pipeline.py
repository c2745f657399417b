"""Text-to-image pipeline: prompt -> tokens -> text encoder -> U-Net (1 or N steps) -> decoder -> PIL.

`SDXSPipeline.load` accepts a preset name (random weights), a diffusers folder (e.g. a local copy of
IDKiro/sdxs-512-dreamshaper or stabilityai/stable-diffusion-2-1-base) or a hub id, and
`save_pretrained` writes a folder that diffusers' own `StableDiffusionPipeline.from_pretrained` loads.
One step uses the pure rule in `sdxs_edge.sampler`; several steps use diffusers' Euler scheduler with
classifier-free guidance, for teachers. Image-to-image is one step at the timestep the strength selects
(`sampler.strength_timestep`), from the image encoded by the VAE's encoder (the tiny encoder the shipped
model carries, or a teacher's, `attach_encoder`).

Calling the pipeline takes diffusers' arguments (`pipe(prompt, num_inference_steps=1,
guidance_scale=0.0, generator=...)`) and returns an object with `.images`, so code written for
diffusers' SDXS example runs unchanged; docs/diffusers-call.md.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdxs_edge import sampler
from sdxs_edge.errors import ModelLoadError, NonFiniteError, SDXSError
from sdxs_edge.models import Components
from sdxs_edge.presets import PRESETS, get_preset
from sdxs_edge.tokenizer import has_tokenizer_files, write_tokenizer_of
from sdxs_edge.weights import check_safetensors

OUTPUT_TYPES = ("pil", "np", "pt", "latent")  # what `SDXSPipeline.__call__` returns, as diffusers names them
META_FILE = "sdxs_edge.json"  # our defaults (steps, guidance) beside diffusers' model_index.json
REQUIRED = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


@dataclass
class Generation:
    """Images plus per-component wall-clock seconds."""

    images: list
    timings: dict[str, float] = field(default_factory=dict)
    latents: torch.Tensor | None = None


def _check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise NonFiniteError(
            f"{name} produced non-finite values (NaN/Inf); the weights may be corrupt or the precision too low"
        )
    return t


def to_pil(images: torch.Tensor) -> list:
    """Decoder output in [-1, 1] (B, 3, H, W) -> PIL images, rounded as diffusers' image processor does."""
    from PIL import Image

    arr = ((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


class SDXSPipeline:
    """A loaded model: components, defaults and generation.

    Args:
        components: tokenizer, text encoder, U-Net, VAE / tiny decoder and scheduler config.
        name: where it came from (preset name, folder or hub id), for reports.
    """

    def __init__(self, components: Components, name: str = "model"):
        self.c = components
        self.name = name
        self.default_steps = 1
        self.default_guidance = 0.0
        self.controlnet = None  # a diffusers ControlNetModel, see `attach_controlnet`
        self.encoder_vae = (
            None  # a VAE whose encoder image-to-image uses instead of the model's own, see `attach_encoder`
        )
        self._control = None  # (control image (B, 3, H, W) in [0, 1], conditioning scale) during generate

    # ---- loading and saving -------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | os.PathLike, seed: int = 0, allow_download: bool = False) -> SDXSPipeline:
        """Load a preset (random weights, seeded), a diffusers folder, or a hub id.

        Args:
            source: preset name, path of a diffusers folder, or "owner/name" on the Hugging Face hub.
            seed: weight seed for presets.
            allow_download: fetch a hub id that is not in the local Hugging Face cache (`--allow-download`);
                without it only a cached copy is used, and a missing one is an error.
        """
        s = str(source)
        if s in PRESETS:
            from sdxs_edge.models import build_components

            preset = get_preset(s)
            pipe = cls(build_components(preset, seed), name=s)
            pipe.default_steps, pipe.default_guidance = preset.default_steps, preset.default_guidance
            return pipe
        path = Path(s).expanduser()
        if path.is_dir():
            return cls.from_folder(path)
        if path.exists():
            raise ModelLoadError(f"{path} is a file; expected a preset or a diffusers model folder")
        if is_hub_id(s):
            return cls.from_folder(fetch_hub_model(s, allow_download), name=s)
        raise ModelLoadError(f"no preset or model folder named {s!r}; valid presets: {', '.join(PRESETS)}")

    @classmethod
    def from_folder(cls, path: Path, name: str | None = None) -> SDXSPipeline:
        import diffusers
        from transformers import CLIPTextModel

        from sdxs_edge.tokenizer import load_clip_tokenizer

        path = Path(path)
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise ModelLoadError(f"{path} has no model_index.json; not a diffusers model folder")
        index = json.loads(index_file.read_text())
        for comp, fname in REQUIRED.items():
            if comp not in index or not (path / comp).is_dir():
                raise ModelLoadError(f"{path} is missing the {comp}/ component")
            f = path / comp / fname
            if not f.is_file():
                bins = [p.name for p in (path / comp).glob("*.bin")]
                hint = (
                    f" (found {', '.join(bins)}: pickled weights are refused, convert them to safetensors)"
                    if bins
                    else ""
                )
                raise ModelLoadError(f"{f} is missing{hint}")
            check_safetensors(f)
        if not (path / "scheduler" / "scheduler_config.json").is_file():
            raise ModelLoadError(f"{path / 'scheduler' / 'scheduler_config.json'} is missing")
        if not has_tokenizer_files(path / "tokenizer"):
            raise ModelLoadError(f"{path / 'tokenizer'} is missing vocab.json + merges.txt (or tokenizer.json)")
        vae_class = index["vae"][1]
        if vae_class not in ("AutoencoderKL", "AutoencoderTiny"):
            raise ModelLoadError(f"{path}: unsupported VAE class {vae_class!r} (AutoencoderKL or AutoencoderTiny)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                unet = diffusers.UNet2DConditionModel.from_pretrained(
                    path / "unet", use_safetensors=True, torch_dtype=torch.float32
                )
                vae = getattr(diffusers, vae_class).from_pretrained(
                    path / "vae", use_safetensors=True, torch_dtype=torch.float32
                )
                text_encoder = CLIPTextModel.from_pretrained(
                    path / "text_encoder", use_safetensors=True, dtype=torch.float32
                )
        except SDXSError:
            raise
        except Exception as e:  # diffusers/transformers raise many kinds; name the folder and keep the cause
            raise ModelLoadError(
                f"cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        pipe = cls(
            Components(
                load_clip_tokenizer(path / "tokenizer"), text_encoder.eval(), unet.eval(), vae.eval(), scheduler_config
            ),
            name=name or str(path),
        )
        meta = path / META_FILE
        if meta.is_file():
            m = json.loads(meta.read_text())
            pipe.default_steps, pipe.default_guidance = int(m["default_steps"]), float(m["default_guidance"])
        return pipe

    def save_pretrained(
        self, folder: str | os.PathLike, overwrite: bool = False, dtype: torch.dtype | None = None
    ) -> Path:
        """Write a diffusers StableDiffusionPipeline folder (safetensors), atomically.

        Args:
            folder: destination; refused if it exists unless `overwrite`.
            overwrite: replace an existing folder.
            dtype: store weights in this dtype (e.g. torch.float16 to halve the size); loading upcasts.
        """
        folder = Path(folder)
        if folder.exists() and not overwrite:
            raise SDXSError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
        from sdxs_edge.atomic import atomic_dir

        with atomic_dir(folder, overwrite=overwrite) as tmp:
            import copy

            for name, module in self.c.modules().items():
                m = copy.deepcopy(module).to(dtype) if dtype is not None else module
                m.save_pretrained(tmp / name, safe_serialization=True)
            # SD checkpoints carry the CLIP BPE files (vocab.json + merges.txt); every supported model
            # uses that one vocabulary, so they are written from the shipped source, not re-serialised.
            write_tokenizer_of(self.c.tokenizer, tmp / "tokenizer")
            from diffusers import EulerDiscreteScheduler

            EulerDiscreteScheduler.from_config(self.c.scheduler_config).save_pretrained(tmp / "scheduler")
            import diffusers

            index = {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": diffusers.__version__,
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", type(self.c.vae).__name__],
            }
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            meta = {"name": self.name, "default_steps": self.default_steps, "default_guidance": self.default_guidance}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        return folder

    def attach_controlnet(self, controlnet) -> SDXSPipeline:
        """Use `controlnet` (a `ControlNetModel` built for this U-Net, or a folder) when `generate` is given a
        control image; None detaches it. Returns self."""
        if controlnet is not None:
            from sdxs_edge.controlnet import check_controlnet, load_controlnet

            if isinstance(controlnet, (str, os.PathLike)):
                controlnet = load_controlnet(controlnet, self.c.unet)
            check_controlnet(controlnet, self.c.unet)
            controlnet = controlnet.to(self.device).eval()
        self.controlnet = controlnet
        return self

    def attach_encoder(self, vae) -> SDXSPipeline:
        """Encode image-to-image inputs with `vae` (a diffusers AutoencoderKL / AutoencoderTiny, or its
        folder, e.g. the teacher's `vae/`) instead of the model's own VAE; None detaches it. Its latents
        must live in this model's latent space (a teacher VAE and its distilled tiny VAE share it).
        Returns self."""
        if isinstance(vae, (str, os.PathLike)):
            import diffusers

            cls = check_vae_folder(vae)
            vae = getattr(diffusers, cls).from_pretrained(Path(vae), use_safetensors=True, torch_dtype=torch.float32)
        if vae is not None:
            vae = vae.to(self.device).eval()
        self.encoder_vae = vae
        return self

    # ---- properties ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.c.unet.device

    def to(self, device: str | torch.device) -> SDXSPipeline:
        """Move the text encoder, U-Net and decoder to `device` (in place); returns self."""
        for m in (self.c.text_encoder, self.c.unet, self.c.vae, self.controlnet):
            if m is not None:
                m.to(device)
        return self

    @property
    def latent_scaling(self) -> float:
        return float(self.c.vae.config.scaling_factor)

    @property
    def resolution(self) -> int:
        return int(self.c.unet.config.sample_size) * 8

    def one_step_constants(self) -> sampler.OneStepConstants:
        return sampler.one_step_constants(self.c.scheduler_config, self.latent_scaling)

    # ---- components ----------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (B, 77); prompts over 77 tokens are truncated with a warning, as diffusers does."""
        tok = self.c.tokenizer
        ids = tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for p in prompts:
            n = len(tok(p).input_ids)
            if n > tok.model_max_length:
                warnings.warn(
                    f"prompt is {n} tokens; CLIP takes {tok.model_max_length}, the rest is truncated: {p[:60]!r}...",
                    stacklevel=2,
                )
        return ids

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenize(prompts).to(self.c.text_encoder.device)
        return _check_finite("text_encoder", self.c.text_encoder(ids)[0])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the U-Net's space -> images in [-1, 1]."""
        return _check_finite("decoder", self.c.vae.decode(latents / self.latent_scaling).sample)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> latents in the U-Net's space (the encoder's mean / output
        times the VAE's scaling factor), with the attached encoder or the model's own VAE."""
        vae = self.encoder_vae if self.encoder_vae is not None else self.c.vae
        return _check_finite("encoder", encode_latents(vae, images.to(self.device, torch.float32)))

    def noise(self, batch: int, seed: int, resolution: int | None = None) -> torch.Tensor:
        """Unit Gaussian latents drawn exactly as diffusers' pipeline draws them for `generator.manual_seed(seed)`.

        Args:
            batch: number of latents.
            seed: generator seed.
            resolution: image side in pixels (default: the model's); latents are resolution // 8.
        """
        if resolution is not None and (resolution <= 0 or resolution % 8):
            raise SDXSError(f"resolution must be a positive multiple of 8, got {resolution}")
        s = resolution // 8 if resolution else self.c.unet.config.sample_size
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn((batch, self.c.unet.config.in_channels, s, s), generator=g, dtype=torch.float32)

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        noise: torch.Tensor | None = None,
        output: str = "pil",
        control_image=None,
        control_scale: float = 1.0,
        image=None,
        strength: float | None = None,
    ) -> Generation:
        """Generate one image per prompt.

        Args:
            prompts: a prompt or a list of prompts (one batch).
            seed: noise seed; the same seed gives the same images on every run.
            steps: U-Net evaluations (default: the model's, 1 for SDXS students).
            guidance: classifier-free guidance scale; <= 1 disables it (SDXS runs with 0).
            noise: explicit unit Gaussian latents (B, 4, h, w) instead of `seed`.
            output: "pil" for PIL images, "tensor" for the decoder output in [-1, 1].
            control_image: with an attached ControlNet: float (B or 1, 3, H, W) in [0, 1], or a path / PIL
                image / uint8 array (`sdxs_edge.control.load_control_image`: resized with a warning when
                its size differs).
            control_scale: strength of the ControlNet residuals.
            image: image-to-image input (one image for the batch): a path, PIL image, uint8 array
                (H, W, 3), or float tensor / array (1, 3, H, W) in [-1, 1]; resized with a warning when
                its size differs from the noise's (`sdxs_edge.init_image.load_init_image`).
            strength: image-to-image strength in (0, 1] (default 0.8, diffusers' default): the timestep
                `sampler.strength_timestep` selects; 1 keeps nothing of the image but what the noise
                level lets through.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        steps = self.default_steps if steps is None else int(steps)
        guidance = self.default_guidance if guidance is None else float(guidance)
        if steps < 1:
            raise SDXSError(f"steps must be >= 1, got {steps}")
        if not prompts:
            raise SDXSError("no prompt given")
        timings: dict[str, float] = {}
        self._control = None
        if control_image is not None:
            self._control = (self._control_tensor(control_image, len(prompts), noise), float(control_scale))
        elif self.controlnet is not None:
            raise SDXSError(
                "a ControlNet is attached but no control image was given (control_image=..., --control IMAGE)"
            )
        t = time.perf_counter()
        ctx = self.encode_prompt(prompts)
        cfg = guidance > 1.0
        if cfg:
            uncond = self.encode_prompt([""] * len(prompts))
        timings["text_encoder"] = time.perf_counter() - t
        x = (self.noise(len(prompts), seed) if noise is None else noise.float()).to(ctx.device)
        init, c = None, self.one_step_constants()
        if image is not None:
            if steps != 1 or cfg:
                raise SDXSError(
                    f"image-to-image runs one step without guidance (got {steps} steps, guidance {guidance:g})"
                )
            t = time.perf_counter()
            init = self._init_latent(image, x)
            c = sampler.one_step_constants(
                self.c.scheduler_config,
                self.latent_scaling,
                sampler.strength_timestep(0.8 if strength is None else strength),
            )
            timings["encoder"] = time.perf_counter() - t
        elif strength is not None:
            raise SDXSError("strength is for image-to-image: give an image too (image=..., --image PATH)")
        t = time.perf_counter()
        try:
            if steps == 1 and not cfg:
                latents = sampler.sample_one_step(lambda x_in, ts, cx: self._unet(x_in, ts, cx), x, ctx, c, init)
            else:
                latents = self._multi_step(x, ctx, uncond if cfg else None, steps, guidance)
        finally:
            self._control = None
        timings["unet"] = time.perf_counter() - t
        t = time.perf_counter()
        images = self.decode(latents)
        timings["decoder"] = time.perf_counter() - t
        out = to_pil(images.cpu()) if output == "pil" else images
        return Generation(out, timings, latents)

    def _init_latent(self, image, noise: torch.Tensor) -> torch.Tensor:
        """The image-to-image input encoded to the noise's latent shape, repeated over the batch."""
        from sdxs_edge.init_image import load_init_image

        B, _, h, w = noise.shape
        a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        x = torch.from_numpy(load_init_image(a, h * 8, w * 8))
        return self.encode(x).expand(B, -1, -1, -1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        image=None,
        strength: float | None = None,
        output_type: str = "pil",
    ) -> Generation:
        """diffusers' pipeline call: `pipe(prompt, num_inference_steps=1, guidance_scale=0.0, generator=g).images`.

        Noise is drawn as diffusers' `randn_tensor` draws it, so a seeded generator gives diffusers'
        image for this model.

        Args:
            prompt: a prompt or a list of prompts.
            num_inference_steps: U-Net evaluations (1 for SDXS).
            guidance_scale: classifier-free guidance scale; <= 1 disables it (SDXS runs with 0).
            height: image height in pixels, a multiple of 8 (default: the model's resolution).
            width: image width in pixels, a multiple of 8 (default: the model's resolution).
            num_images_per_prompt: images per prompt (prompt order: each prompt's images together).
            generator: a `torch.Generator` (one draw for the whole batch), a list of one per image, or
                None (PyTorch's global generator).
            image: image-to-image input (see `generate`); resized to height x width with a warning.
            strength: image-to-image strength in (0, 1] (default 0.8 with an image).
            output_type: "pil" (PIL images), "np" (float (B, H, W, 3) in [0, 1]), "pt" (float tensor
                (B, 3, H, W) in [0, 1]) or "latent" (the one-step latents).
        """
        if output_type not in OUTPUT_TYPES:
            raise SDXSError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if int(num_images_per_prompt) < 1:
            raise SDXSError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(int(num_images_per_prompt))]
        shape = (len(prompts), self.c.unet.config.in_channels, *self._latent_size(height, width))
        noise = _randn_like_diffusers(shape, generator)
        gen = self.generate(
            prompts,
            steps=num_inference_steps,
            guidance=guidance_scale,
            noise=noise,
            output="tensor",
            image=image,
            strength=strength,
        )
        images = (gen.images.cpu() / 2 + 0.5).clamp(0, 1)
        if output_type == "pil":
            gen.images = to_pil(gen.images.cpu())
        elif output_type == "np":
            gen.images = images.permute(0, 2, 3, 1).numpy()
        elif output_type == "pt":
            gen.images = images
        else:
            gen.images = gen.latents
        return gen

    def _latent_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        h = self.resolution if height is None else height
        w = self.resolution if width is None else width
        for name, v in (("height", h), ("width", w)):
            if int(v) <= 0 or int(v) % 8:
                raise SDXSError(f"{name} must be a positive multiple of 8, got {v}")
        return int(h) // 8, int(w) // 8

    def _control_tensor(self, control_image, batch: int, noise: torch.Tensor | None) -> torch.Tensor:
        if self.controlnet is None:
            raise SDXSError("a control image needs a ControlNet (attach_controlnet, --controlnet PATH)")
        res = noise.shape[-1] * 8 if noise is not None else self.resolution
        if isinstance(control_image, torch.Tensor):
            c = control_image.float()
            if c.dim() != 4 or c.shape[1] != 3 or tuple(c.shape[2:]) != (res, res):
                raise SDXSError(f"control image tensor must be (B, 3, {res}, {res}) in [0, 1], got {list(c.shape)}")
        else:
            from sdxs_edge.control import load_control_image

            c = torch.from_numpy(load_control_image(control_image, res))
        if c.shape[0] == 1 and batch > 1:
            c = c.expand(batch, -1, -1, -1)
        if c.shape[0] != batch:
            raise SDXSError(f"{c.shape[0]} control images for {batch} prompts")
        return c.to(self.device)

    def _unet(self, x: torch.Tensor, t, ctx: torch.Tensor) -> torch.Tensor:
        if self._control is not None:
            cond, scale = self._control
            n = x.shape[0] // cond.shape[0]  # classifier-free guidance doubles the batch
            down, mid = self.controlnet(x, t, ctx, torch.cat([cond] * n), conditioning_scale=scale, return_dict=False)
            return _check_finite(
                "unet",
                self.c.unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample,
            )
        return _check_finite("unet", self.c.unet(x, t, ctx).sample)

    def _multi_step(self, noise, ctx, uncond, steps: int, guidance: float) -> torch.Tensor:
        from diffusers import EulerDiscreteScheduler

        sched = EulerDiscreteScheduler.from_config(self.c.scheduler_config)
        sched.set_timesteps(steps, device=noise.device)
        x = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            if uncond is not None:
                e_u, e_c = self._unet(torch.cat([x_in, x_in]), t, torch.cat([uncond, ctx])).chunk(2)
                eps = e_u + guidance * (e_c - e_u)
            else:
                eps = self._unet(x_in, t, ctx)
            x = sched.step(eps, t, x).prev_sample
        return x


def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> latents in the U-Net's space: an AutoencoderKL's posterior mean
    (deterministic) or an AutoencoderTiny's output, times the VAE's scaling factor. The pipeline and the
    bundle's encoder component (`sdxs_edge.components.Encoder`) both encode through this."""
    if hasattr(vae, "quant_conv"):
        z = vae.encode(images).latent_dist.mode()
    else:
        z = vae.encode(images).latents
    return z * float(vae.config.scaling_factor)


def check_vae_folder(folder: str | os.PathLike) -> str:
    """Check a diffusers VAE folder (config + safetensors weights) before loading it; returns its class name."""
    folder = Path(folder)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{folder} has no config.json; expected a diffusers VAE folder (e.g. MODEL/vae)")
    cls = json.loads(cfg.read_text()).get("_class_name")
    if cls not in ("AutoencoderKL", "AutoencoderTiny"):
        raise ModelLoadError(f"{folder}: unsupported VAE class {cls!r} (AutoencoderKL or AutoencoderTiny)")
    check_safetensors(folder / "diffusion_pytorch_model.safetensors")
    return cls


def _randn_like_diffusers(shape: tuple[int, ...], generator) -> torch.Tensor:
    """Unit Gaussian latents as diffusers' `randn_tensor` draws them on the CPU: one draw of the whole
    shape from one generator, or one image per generator from a list."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise SDXSError(f"{len(generator)} generators for {shape[0]} images; give one per image or a single one")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])
    if generator is not None and not isinstance(generator, torch.Generator):
        raise SDXSError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def is_hub_id(source: str) -> bool:
    """ "owner/name" that is not a preset or an existing path: a Hugging Face hub id."""
    s = str(source)
    return (
        s not in PRESETS
        and s.count("/") == 1
        and not s.startswith((".", "/", "~"))
        and not Path(s).expanduser().exists()
    )


def fetch_hub_model(repo_id: str, allow_download: bool = False) -> Path:
    """A diffusers repo's safetensors weights and configs: from the local Hugging Face cache, or, only
    with `allow_download`, from the hub (needs a network).

    Args:
        repo_id: "owner/name" on the hub.
        allow_download: fetch what the cache lacks; without it nothing goes over the network.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(f"{repo_id!r} is a hub id, and loading one needs the huggingface_hub package") from None
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"],
                ignore_patterns=["*fp16*", "*non_ema*", "*.ckpt", "*.bin"],
                local_files_only=not allow_download,
            )
        )
    except Exception as e:
        if not allow_download:
            raise ModelLoadError(
                f"{repo_id!r} is a Hugging Face hub id that is not in the local cache; sdxs-edge downloads only when asked: pass --allow-download, or a local model folder"
            ) from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({first[:160]}); without a network, download it elsewhere and pass the local folder"
        ) from e
