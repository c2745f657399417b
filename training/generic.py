"""The chain on any Stable Diffusion teacher: what `sdxs-edge train all --teacher PATH_OR_PRESET --prompts FILE`
adds to the SHAPES-64 chain.

- the teacher is checked before any training: SD-1.x / SD-2.x topology (4-channel latents, four U-Net
  stages with a cross-attention mid block and two resnets per stage, a KL VAE, one CLIP text encoder);
- the student layout comes from the teacher's config by the SDXS block-removal rule
  (`presets.block_removed`, `presets.SDXS_LAYER_MAP`) and the tiny decoder is the TAESD layout;
- the data is a prompt file (ODE pairs, score distillation) and, for the decoder and U-Net KD, either an
  image folder in the Hugging Face imagefolder layout or the teacher's own samples for those prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sdxs_edge.errors import SDXSError
from sdxs_edge.presets import SD21_DOWN, SD21_UP, SDXS_LAYER_MAP, ModelPreset, _tiny_vae, block_removed, get_preset

SUPPORTED = (
    "supported teachers: a preset or a diffusers StableDiffusionPipeline folder of the SD-1.x / SD-2.x family "
    "(4-channel latents, a 4-stage U-Net with a cross-attention mid block and 2 resnets per stage, AutoencoderKL, "
    "one CLIP text encoder)"
)
# The TAESD decoder (ANCHORS.md), for any 4-channel latent space.
TAESD = _tiny_vae(channels=64, encoder_blocks=(1, 3, 3, 3), decoder_blocks=(3, 3, 3, 1))


class TrainingInputError(SDXSError):
    """A teacher, prompt file, image folder or run folder the generic chain cannot take."""


def check_teacher_folder(path: Path) -> None:
    """Refuse, from its config files alone, a folder that is not an SD-1.x / SD-2.x pipeline."""
    index_f = path / "model_index.json"
    if not index_f.is_file():
        raise TrainingInputError(f"teacher {path} has no model_index.json; {SUPPORTED}")
    index = json.loads(index_f.read_text())
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise TrainingInputError(
            f"teacher {path} is a {index.get('_class_name', 'two-text-encoder')} folder; {SUPPORTED}"
        )
    unet_f = path / "unet" / "config.json"
    if not unet_f.is_file():
        raise TrainingInputError(f"teacher {path} has no unet/config.json; {SUPPORTED}")
    check_unet_config(json.loads(unet_f.read_text()), str(path))


def precheck(teacher: str | None, prompts: str, images: str | None) -> None:
    """What can be checked before a run folder is touched: the prompt file, the teacher folder's configs
    (or that it names a preset), the image folder's metadata.jsonl."""
    from sdxs_edge.presets import PRESETS

    read_prompts(prompts)
    if not teacher:
        raise TrainingInputError(f"--prompts needs --teacher PATH_OR_PRESET; {SUPPORTED}")
    if Path(teacher).is_dir():
        check_teacher_folder(Path(teacher))
    elif teacher not in PRESETS:
        raise TrainingInputError(f"teacher {teacher!r} is neither a folder nor a preset ({', '.join(PRESETS)})")
    if images and not (Path(images) / "metadata.jsonl").is_file():
        raise TrainingInputError(
            f"image folder {images} has no metadata.jsonl (imagefolder layout: file_name and text per line)"
        )


def check_unet_config(c: dict, name: str) -> None:
    """SD-1.x / SD-2.x U-Net topology, the one the block-removal rule and layer map are written for."""
    problems = []
    if c.get("in_channels") != 4 or c.get("out_channels") != 4:
        problems.append(f"{c.get('in_channels')}-channel latents")
    if list(c.get("down_block_types", [])) != list(SD21_DOWN) or list(c.get("up_block_types", [])) != list(SD21_UP):
        problems.append(f"blocks {c.get('down_block_types')}")
    if (
        c.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn"
        or c.get("layers_per_block") != 2
    ):
        problems.append(f"mid block {c.get('mid_block_type')}, {c.get('layers_per_block')} resnets per stage")
    if (
        c.get("addition_embed_type")
        or c.get("class_embed_type")
        or c.get("transformer_layers_per_block", 1) not in (1, [1] * 4)
    ):
        problems.append("SDXL-style embeddings / transformer depth")
    if problems:
        raise TrainingInputError(f"teacher {name}: {'; '.join(problems)}; {SUPPORTED}")


def check_teacher_pipe(pipe) -> None:
    """The loaded teacher (a preset or a folder): U-Net topology, KL VAE with 4 latent channels."""
    check_unet_config(dict(pipe.c.unet.config), pipe.name)
    if type(pipe.c.vae).__name__ != "AutoencoderKL" or pipe.c.vae.config.latent_channels != 4:
        raise TrainingInputError(f"teacher {pipe.name}: {type(pipe.c.vae).__name__} decoder; {SUPPORTED}")


def check_resolution(pipe, resolution: int) -> None:
    """The U-Net halves the latent three times, so the latent side must be a multiple of 8."""
    if resolution <= 0 or resolution % 64:
        raise TrainingInputError(
            f"--resolution {resolution}: teacher {pipe.name} takes multiples of 64 (latents divisible by its 3 downsamplings)"
        )


def student_preset(teacher_unet_config: dict, override: str | None) -> ModelPreset:
    """The student: `override` (a preset name) or the block-removed layout of the teacher with the TAESD decoder."""
    if override:
        p = get_preset(override)
        if p.unet["cross_attention_dim"] != teacher_unet_config["cross_attention_dim"]:
            raise TrainingInputError(
                f"--student {override}: cross_attention_dim {p.unet['cross_attention_dim']} differs from the teacher's "
                f"{teacher_unet_config['cross_attention_dim']} (the text encoder is kept)"
            )
        return p
    return ModelPreset(
        name="block-removed",
        summary="SDXS block-removed layout of the teacher, TAESD tiny decoder",
        resolution=int(teacher_unet_config["sample_size"]) * 8,
        text_encoder={},
        unet=block_removed(teacher_unet_config),
        vae_class="AutoencoderTiny",
        vae=TAESD,
        layer_map=SDXS_LAYER_MAP,
    )


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a prompt file; an error when the file is missing or has none."""
    path = Path(path)
    if not path.is_file():
        raise TrainingInputError(f"prompt file {path} not found")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise TrainingInputError(f"prompt file {path} is not UTF-8 text") from None
    if not prompts:
        raise TrainingInputError(f"prompt file {path} has no prompts (one per line)")
    return prompts


def read_imagefolder(folder: str | Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Images (N, 3, R, R) in [-1, 1] and their texts from a Hugging Face imagefolder
    (`metadata.jsonl` lines with `file_name` and `text`); every image is loaded and checked first."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise TrainingInputError(
            f"image folder {folder} has no metadata.jsonl (imagefolder layout: file_name and text per line)"
        )
    images, texts = [], []
    for k, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TrainingInputError(f"{meta} line {k}: expected a JSON object with file_name and text") from None
        f = (folder / name).resolve()
        if folder.resolve() not in f.parents:
            raise TrainingInputError(f"{meta} line {k}: {name} leads outside the image folder")
        try:
            with Image.open(f) as im:
                img = im.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        except (OSError, UnidentifiedImageError) as e:
            raise TrainingInputError(f"image {f} does not load ({type(e).__name__})") from None
        images.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
        texts.append(text)
    if not images:
        raise TrainingInputError(f"{meta} lists no images")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), texts


def image_cache(folder: str | Path, resolution: int, vae, tokenizer, path: Path) -> dict[str, torch.Tensor]:
    """The latent cache (posterior mean, std, token ids) of an image folder, written once to `path`."""
    from safetensors.torch import load_file, save_file

    from sdxs_edge.atomic import atomic_file

    if path.is_file():
        return load_file(str(path))
    images, texts = read_imagefolder(folder, resolution)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            post = vae.encode(images[i : i + 64].to(vae.device)).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    cache = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(), "ids": ids.int().contiguous()}
    with atomic_file(path) as tmp:
        save_file(cache, str(tmp))
    return cache


def sample_cache(pairs: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The latent cache from the teacher's own samples (the ODE pairs' endpoints): a point posterior."""
    mean = pairs["x0"] / scaling
    return {"mean": mean, "std": torch.zeros_like(mean), "ids": pairs["ids"]}


def stage_losses(out: Path) -> dict[str, Any]:
    """Per-stage first and last logged losses (log.jsonl of each stage folder)."""
    losses = {}
    for log in sorted(out.glob("*/log.jsonl")):
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "step" in r]
        if rows:
            keys = [k for k in rows[-1] if "loss" in k]
            losses[log.parent.name] = {
                "steps": rows[-1]["step"],
                "first": {k: rows[0].get(k) for k in keys},
                "last": {k: rows[-1][k] for k in keys},
            }
    return losses


def format_generic_report(report: dict) -> str:
    lines = [
        f"# SDXS chain on {report['teacher']}",
        "",
        f"Prompts: {report['prompts']} ({report['n_prompts']}); images: {report['images'] or 'the teacher own samples'}; resolution {report['resolution']}.",
        "",
        "| stage | steps | first losses | last losses |",
        "|---|---|---|---|",
    ]
    fmt = lambda d: ", ".join(f"{k} {v:.4g}" for k, v in d.items() if isinstance(v, (int, float)))  # noqa: E731
    for name, s in report["losses"].items():
        lines.append(f"| {name} | {s['steps']} | {fmt(s['first'])} | {fmt(s['last'])} |")
    lines += ["", "| model | steps | U-Net params | CPU s/image | grid |", "|---|---|---|---|---|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m['steps']} | {m['unet_params']:,} | {m['cpu_latency_s']:.3f} | {m['grid']} |")
    lines += [
        "",
        "Stage wall-clock seconds: " + ", ".join(f"{k} {v}" for k, v in report.get("stage_seconds", {}).items()),
        "",
    ]
    return "\n".join(lines)
