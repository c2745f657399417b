"""The stages of one conversion, in the order `converters.api.run` calls them.

    sources  read the LoRA file and the ControlNet folder (a bad one fails before the model loads)
    load     the model as given, and the sha256 of its weights
    prepare  copies of what the conversion changes: LoRA fused, attention layout, ControlNet checked
    capture  calibration and parity tensors from real PyTorch one-step runs
    lower    per component: the backend's export -> quantize (calibration, sensitivity) -> lower
    check    per component, then end to end, against PyTorch (`converters.parity`); the PyTorch images of
             the check written as the bundle's self-check reference (`sdxs_edge.selfcheck`)
    write    tokenizer, the manifest (built by `build_manifest` from the stage results), verification

Each stage takes the request and what earlier stages returned, and returns a small frozen record.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters import calibration, parity
from converters.base import ComponentJob, ComponentResult, ConversionConfig
from converters.registry import component_export
from converters.request import ConversionRequest
from converters.sensitivity import refusal_detail
from sdxs_edge.bundle import FORMAT, FORMAT_VERSION, BundleError, load_manifest, sha256_path, validate_manifest
from sdxs_edge.errors import ParityError, SDXSError
from sdxs_edge.weights import modules_sha256

BACKENDS = {"onnx": "converters.to_onnx", "executorch": "converters.to_executorch", "coreml": "converters.to_coreml"}
TOKENIZER_DIR = "tokenizer"
CONTROL_IMAGES = (
    "canny edges of a SHAPES-64 render of each prompt's scene (a random scene for other prompts), "
    "sdxs_edge.control.prompt_controls seeded by the sample's seed"
)


def backend(target: str):
    """The backend module of a target (imported lazily: each pulls its own heavy libraries)."""
    return importlib.import_module(BACKENDS[target])


def weights_sha256(pipe) -> str:
    """sha256 of the network weights as loaded: per module (text_encoder, unet, vae) and sorted tensor name,
    the name, dtype, shape and raw bytes. The same for a preset, a folder or a pipeline instance."""
    return modules_sha256(pipe.c.modules())


# ---- sources -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sources:
    """The LoRA and ControlNet as read from disk (or the ControlNet module passed in), with their sha256."""

    lora_weights: Any = None
    lora_file: Path | None = None
    lora_sha256: str | None = None
    controlnet: Any = None
    controlnet_path: Path | None = None
    controlnet_sha256: str | None = None


def read_sources(req: ConversionRequest) -> Sources:
    """Read the LoRA file and ControlNet folder; a bad one fails here, before the model is loaded."""
    lora = {}
    if req.lora is not None:
        from sdxs_edge.lora import load_lora, resolve_lora_path

        f = resolve_lora_path(req.lora)
        lora = {"lora_weights": load_lora(f), "lora_file": f, "lora_sha256": sha256_path(f)}
    cn = {"controlnet": req.controlnet}
    if isinstance(req.controlnet, (str, os.PathLike)):
        from sdxs_edge.controlnet import load_controlnet

        path = Path(req.controlnet)
        cn = {"controlnet": load_controlnet(path), "controlnet_path": path, "controlnet_sha256": sha256_path(path)}
    return Sources(**lora, **cn)


# ---- load and prepare ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """The pipeline the conversion lowers (copies of the caller's modules where it changes them)."""

    pipe: Any
    controlnet: Any
    source_sha256: str
    fused: tuple[str, ...]
    trained: bool
    resolution: int
    sizes: tuple[tuple[int, int], ...] = ()  # (width, height); the first is the default

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: 8 (the VAE) x the U-Net's downsampling."""
        return 8 * 2 ** (len(self.pipe.c.unet.config.block_out_channels) - 1)


def load(req: ConversionRequest):
    """The model as given: a loaded `SDXSPipeline` is used as is, anything else is loaded."""
    from sdxs_edge.pipeline import SDXSPipeline

    return req.model if isinstance(req.model, SDXSPipeline) else SDXSPipeline.load(req.model, seed=req.seed)


def _with_copies(pipe, names: set[str]):
    """The pipeline with deep copies of modules `names` (the caller's pipeline is never modified)."""
    from sdxs_edge.pipeline import SDXSPipeline

    if not names:
        return pipe
    copies = {n: copy.deepcopy(getattr(pipe.c, n)) for n in sorted(names)}
    out = SDXSPipeline(dataclasses.replace(pipe.c, **copies), name=pipe.name)
    out.default_steps, out.default_guidance = pipe.default_steps, pipe.default_guidance
    return out


def prepare(req: ConversionRequest, pipe, src: Sources) -> Prepared:
    """Fuse the LoRA, set the attention layout and check the ControlNet fits, on copies of the modules."""
    from sdxs_edge.presets import PRESETS

    source_sha256 = weights_sha256(pipe)  # of the model as given, before any LoRA
    changed = ({"unet"} if src.lora_weights is not None else set()) | (
        {"unet", "vae"} if req.attention != "standard" else set()
    )
    pipe = _with_copies(pipe, changed if pipe is req.model else set())  # a loaded model is already ours
    fused: list[str] = []
    if src.lora_weights is not None:
        from sdxs_edge.lora import fuse_lora

        fused = fuse_lora(pipe.c.unet, src.lora_weights, scale=req.lora_scale)
    controlnet = src.controlnet
    if req.attention != "standard":
        from sdxs_edge.attention import set_attention

        set_attention(pipe.c.unet, req.attention)
        set_attention(pipe.c.vae, req.attention)
        if controlnet is not None:
            controlnet = copy.deepcopy(controlnet) if src.controlnet_path is None else controlnet
            set_attention(controlnet, req.attention)
    if controlnet is not None:  # one line naming the mismatch, before any capture or lowering
        from sdxs_edge.controlnet import check_controlnet

        check_controlnet(controlnet, pipe.c.unet)
    trained = req.trained if req.trained is not None else pipe.name not in PRESETS
    res = _resolution(req, pipe)
    return Prepared(pipe, controlnet, source_sha256, tuple(fused), trained, res, _sizes(req, pipe, res))


def _resolution(req: ConversionRequest, pipe) -> int:
    res = req.resolution or pipe.resolution
    stages = len(pipe.c.unet.config.block_out_channels)
    if res % (8 * 2 ** (stages - 1)):
        raise SDXSError(
            f"resolution {res} must be a multiple of {8 * 2 ** (stages - 1)} for this U-Net ({stages} stages)"
        )
    return res


def _sizes(req: ConversionRequest, pipe, res: int) -> tuple[tuple[int, int], ...]:
    """The sizes to lower: the request's (each a multiple of the U-Net's downsampling), or the one size."""
    if req.sizes is None:
        return ((res, res),)
    stages = len(pipe.c.unet.config.block_out_channels)
    mult = 8 * 2 ** (stages - 1)
    for w, h in req.sizes:
        if w % mult or h % mult:
            raise SDXSError(
                f"size {w}x{h}: width and height must be multiples of {mult} for this U-Net ({stages} stages)"
            )
    return tuple(req.sizes)


def conversion_config(req: ConversionRequest, prep: Prepared, src: Sources, n_prompts: int) -> ConversionConfig:
    """The resolved settings recorded under the manifest's "conversion.config"."""
    has_lora, has_cn = src.lora_file is not None, prep.controlnet is not None
    optional = {}
    if req.sensitivity_shortlist is not None:
        optional["sensitivity_shortlist"] = int(req.sensitivity_shortlist)
    if req.max_float_fraction is not None:
        optional["max_excluded_fraction"] = float(req.max_float_fraction)
    return ConversionConfig(
        target=req.target,
        precision=req.precision,
        components=req.components,
        resolution=prep.resolution,
        batch=req.batch,
        dynamic=req.dynamic,
        palettize=req.palettize,
        delegate=req.delegate,
        calibration_prompts=n_prompts if req.calibrate else 0,
        calibration_source=req.calibration_source if req.calibrate else "not used",
        sensitivity=req.sensitivity,
        **optional,
        onnx_calibration=req.onnx_calibration,
        lora=str(src.lora_file) if has_lora else None,
        lora_sha256=src.lora_sha256,
        lora_scale=float(req.lora_scale) if has_lora else None,
        lora_fused_modules=len(prep.fused),
        controlnet=(str(src.controlnet_path) if src.controlnet_path is not None else "<module>") if has_cn else None,
        controlnet_sha256=src.controlnet_sha256,
        control_scale=float(req.control_scale) if has_cn else None,
        attention=req.attention,
        sizes=tuple(prep.sizes) if req.sizes is not None else (),
        max_batch=req.max_batch,
    )


# ---- capture -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Captures:
    """Calibration tensors (None when nothing calibrates) and the parity tensors, per component."""

    calib: Any
    check: Any


def capture(req: ConversionRequest, prep: Prepared, modules: dict, prompts: list[str]) -> Captures:
    """Run the PyTorch one-step pipeline on the calibration prompts and on the fixed parity prompts.

    With several sizes, the calibration prompts are dealt out over the sizes in turn (every size gets
    at least one), so int8 ranges cover every size at the cost of one size; the parity prompts run at
    every size. `Captures.check` then holds the sizes' samples one size after another."""
    batch, sizes = req.batch, prep.sizes
    calib = None
    if req.calibrate:
        dealt = [prompts[i :: len(sizes)] or prompts[:1] for i in range(len(sizes))]
        calib = calibration.merge(
            [calibration.capture(prep.pipe, modules, p, seed0=0, batch=batch, size=sz) for p, sz in zip(dealt, sizes)]
        )
    check = calibration.merge(
        [
            calibration.capture(
                prep.pipe, modules, calibration.PARITY_PROMPTS, seed0=calibration.PARITY_SEED0, batch=batch, size=sz
            )
            for sz in sizes
        ]
    )
    return Captures(calib, check)


# ---- lower and check, per component --------------------------------------------------------------------
def _one_step_x0(pipe, timed: bool):
    """(U-Net input sample, output) -> the one-step x0 at the sample's timestep (its third input when the
    U-Net takes one, else the one-step timestep). x = x_in * sqrt(sigma^2 + 1) for text-to-image and
    image-to-image alike, so the noise-equivalent x_in / input_scale gives the exact x0."""
    from sdxs_edge import sampler

    def score(sample, output):
        t = int(np.asarray(sample[2]).ravel()[0]) if timed else None
        c = sampler.one_step_constants(pipe.c.scheduler_config, pipe.latent_scaling, t)
        latent = np.asarray(sample[0], np.float32)
        return np.asarray(sampler.denoised(output, latent / np.float32(c.input_scale), c), np.float32)

    return score


def component_job(
    req, prep: Prepared, name: str, modules: dict, specs: dict, caps: Captures, config, work: Path, tmp: Path
) -> ComponentJob:
    """What the backend needs to lower one component (fp32/fp16 get the parity tensors as examples)."""
    import torch

    ins, outs = specs[name]
    cal = caps.calib or caps.check
    export = component_export(name, req.target)
    return ComponentJob(
        name=name,
        module=modules[name],
        example=tuple(torch.from_numpy(x) for x in caps.check.inputs[name][0]),
        inputs=ins,
        outputs=outs,
        calib=cal.inputs[name],
        calib_ref=cal.outputs[name],
        spec=req.spec,
        export=export,
        config=config,
        work=work,
        out=tmp / export.file,
        score=_one_step_x0(prep.pipe, req.has_encoder) if name == "unet" and prep.trained else None,
        size_examples=_size_examples(prep, name, caps),
    )


def _size_examples(prep: Prepared, name: str, caps: Captures) -> tuple:
    """((width, height), example inputs as torch tensors) per size: the first parity sample at each."""
    import torch

    per = len(caps.check.inputs[name]) // len(prep.sizes)  # a bundle with an encoder has 2 U-Net samples each
    return tuple(
        (sz, tuple(torch.from_numpy(x) for x in caps.check.inputs[name][i * per])) for i, sz in enumerate(prep.sizes)
    )


def check_component(req: ConversionRequest, name: str, result: ComponentResult, caps: Captures) -> dict:
    """Per-component parity against PyTorch; a structural record where the lowered model cannot run here."""
    if result.runner is None:
        return {"checked": "structural", **(result.structural or {})}
    figs = parity.component_figures(result.runner, caps.check.inputs[name], caps.check.outputs[name])
    label = f"{req.target}/{req.precision}"
    try:
        rec = parity.check_component(name, figs, req.spec.tolerance, label)
        if req.sizes is not None and len(req.sizes) > 1:
            rec["sizes"] = _per_size(req, name, result, caps, label)
        return rec
    except ParityError as e:
        raise ParityError(f"{e}{refusal_detail(result.report)}") from None


def _per_size(req: ConversionRequest, name: str, result: ComponentResult, caps: Captures, label: str) -> dict:
    """The component's parity at each size ("WxH" -> figures), each held to the floor."""
    per = len(caps.check.inputs[name]) // len(req.sizes)  # the component's samples, one size after another
    out = {}
    for i, (w, h) in enumerate(req.sizes):
        part = slice(i * per, (i + 1) * per)
        figs = parity.component_figures(result.runner, caps.check.inputs[name][part], caps.check.outputs[name][part])
        out[f"{w}x{h}"] = parity.check_component(f"{name} at {w}x{h}", figs, req.spec.tolerance, label)
    return out


def check_end_to_end(req: ConversionRequest, prep: Prepared, results: dict, modules: dict, caps: Captures) -> dict:
    """Image parity through the lowered components, enforced for trained int8; recorded as why not else."""
    runnable = all(r.runner is not None for r in results.values())
    needed = set(modules)  # the three, and the ControlNet when there is one
    if set(req.components) == needed and runnable:
        figures = parity.end_to_end(
            {n: r.runner for n, r in results.items()}, caps.check, prep.pipe.one_step_constants()
        )
        return parity.check_end_to_end(figures, req.spec.tolerance, prep.trained, f"{req.target}/{req.precision}")
    if set(req.components) != needed:
        why = f"not all {'three' if len(needed) == 3 else 'four (with the ControlNet)'} components are in the bundle"
    else:
        why = "the lowered models cannot run on this machine"
    return {"image_psnr_db": None, "enforced": False, "why_not_enforced": f"not computed: {why}"}


def write_selfcheck(req: ConversionRequest, prep: Prepared, caps: Captures, bundle: Path) -> dict | None:
    """The PyTorch images of the parity samples written into the bundle (`sdxs_edge.selfcheck`), so a
    runtime can be checked against them without PyTorch; the manifest's "selfcheck" entry, or None for a
    bundle without every component (it cannot generate an image)."""
    if set(req.components) != set(caps.check.inputs):
        return None
    from sdxs_edge import selfcheck

    B, prompts = req.batch, list(calibration.PARITY_PROMPTS)
    n = len(caps.check) // len(prep.sizes)  # the samples at the default (first) size
    cycled = [prompts[i % len(prompts)] for i in range(n * B)]  # as `calibration.capture` does
    samples = [{"prompts": cycled[i * B : (i + 1) * B], "seed": calibration.PARITY_SEED0 + i} for i in range(n)]
    images = np.concatenate(caps.check.images[:n])
    return selfcheck.record(bundle, images, samples, calibration.NOISE_RNG, req.precision, prep.trained)


# ---- write ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lowered:
    """What the lower and check stages produced, for the manifest."""

    results: dict
    parity_components: dict
    end_to_end: dict
    specs: dict
    config: ConversionConfig
    n_parity_samples: int
    selfcheck: dict | None = None


def _versions(target: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = {"onnx": ("onnx", "onnxruntime"), "executorch": ("executorch", "torchao"), "coreml": ("coremltools",)}[
        target
    ]
    out = {}
    for n in ("torch", "diffusers", "transformers") + names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (1 << 20) if platform.system() == "Darwin" else r / 1024, 1)


def _controlnet_record(req: ConversionRequest, prep: Prepared, src: Sources) -> dict:
    """The manifest's "source.controlnet": where the ControlNet came from, so the PyTorch reference can
    load it again (`runtimes.torch_session`), and what it was."""
    cn = prep.controlnet
    return {
        "model": str(src.controlnet_path) if src.controlnet_path is not None else None,
        "sha256": src.controlnet_sha256,
        "sha256_of": "the ControlNet folder's files (sdxs_edge.bundle.sha256_path); null for a module passed in",
        "weights_sha256": modules_sha256({"controlnet": cn}),
        "weights_sha256_of": "ControlNet weights as loaded (state dict; name, dtype, shape, bytes)",
        "class": type(cn).__name__,
        "conditioning_embedding_out_channels": list(cn.config.conditioning_embedding_out_channels),
        "control_scale": float(req.control_scale),
        "control_image": "float32 (B, 3, H, W) in [0, 1], white canny edges on black (sdxs_edge.control)",
    }


def _source_record(req: ConversionRequest, prep: Prepared, src: Sources) -> dict:
    from sdxs_edge.pipeline import SDXSPipeline
    from sdxs_edge.presets import PRESETS

    pipe = prep.pipe
    return {
        "model": pipe.name,
        "sha256": prep.source_sha256,
        "sha256_of": "network weights as loaded (text_encoder, unet, vae state dicts; name, dtype, shape, bytes)",
        "trained": bool(prep.trained),
        # weights of a preset are random with this seed; None for a folder or a pipeline passed in
        "preset_seed": req.seed if pipe.name in PRESETS and not isinstance(req.model, SDXSPipeline) else None,
        "unet_class": type(pipe.c.unet).__name__,
        "vae_class": type(pipe.c.vae).__name__,
        **({"controlnet": _controlnet_record(req, prep, src)} if prep.controlnet is not None else {}),
    }


def _component_entries(low: Lowered, bundle: Path) -> dict:
    entries = {}
    for name, r in low.results.items():
        ins, outs = low.specs[name]
        entry = {
            "file": r.file,
            "sha256": sha256_path(bundle / r.file),
            "inputs": [s.to_dict() for s in ins],
            "outputs": [s.to_dict() for s in outs],
        }
        if r.extra_files:
            entry["external_data"] = [{"file": f, "sha256": sha256_path(bundle / f)} for f in r.extra_files]
        entries[name] = entry
    return entries


def _scheduler_record(pipe) -> dict:
    """The manifest's "scheduler": the betas image-to-image picks its timestep's sigma from (`sdxs_edge.sampler`)."""
    cfg = pipe.c.scheduler_config
    return {
        "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000)),
        "beta_start": float(cfg.get("beta_start", 0.00085)),
        "beta_end": float(cfg.get("beta_end", 0.012)),
        "beta_schedule": str(cfg.get("beta_schedule", "scaled_linear")),
    }


def _size_record(req: ConversionRequest, prep: Prepared) -> dict:
    """The manifest's "sizes", "max_batch" and "size_multiple" (`sdxs_edge.sizes`); none for a bundle of
    one size and a static batch, which reads as before."""
    out: dict = {}
    if req.sizes is not None:
        out["sizes"] = [list(s) for s in prep.sizes]
        out["size_multiple"] = prep.size_multiple
    if req.max_batch > 1:
        out["max_batch"] = req.max_batch
    return out


def build_manifest(
    req: ConversionRequest, prep: Prepared, src: Sources, low: Lowered, bundle: Path, timings: dict, t_start: float
) -> dict:
    """The bundle's manifest.json, from the request and the stage results (`sdxs_edge.bundle` validates it)."""
    spec, tok = req.spec, prep.pipe.c.tokenizer
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": _source_record(req, prep, src),
        "target": req.target,
        "precision": req.precision,
        "resolution": prep.resolution,
        "batch": req.batch,
        **_size_record(req, prep),
        "sampler": prep.pipe.one_step_constants().to_dict(),
        **({"scheduler": _scheduler_record(prep.pipe)} if req.has_encoder else {}),
        "tokenizer": {"dir": TOKENIZER_DIR, "max_length": int(tok.model_max_length), "pad_token": str(tok.pad_token)},
        "components": _component_entries(low, bundle),
        "parity": {
            "checked": "numeric" if spec.runs_here and req.delegate == "xnnpack" else "structural",
            "reference": "PyTorch float32 wrappers (sdxs_edge.components) on the same inputs",
            "prompts": list(calibration.PARITY_PROMPTS),
            **({"control_images": CONTROL_IMAGES} if prep.controlnet is not None else {}),
            "seeds": [calibration.PARITY_SEED0 + i for i in range(low.n_parity_samples)],
            "null_db_means": "exact match (infinite SNR / PSNR)",
            "components": low.parity_components,
            "end_to_end": low.end_to_end,
        },
        **({"selfcheck": low.selfcheck} if low.selfcheck is not None else {}),
        "conversion": {
            "config": low.config.to_dict(),
            "registry": {
                "summary": spec.summary,
                "floor_snr_db": spec.tolerance.snr_db,
                "floor_image_psnr_db": spec.tolerance.image_psnr_db,
            },
            "versions": _versions(req.target),
            "components": {
                n: {**r.report, "tracer": component_export(n, req.target).tracer} for n, r in low.results.items()
            },
            "seconds": round(time.perf_counter() - t_start, 3),
            "stage_seconds": timings,
            "peak_rss_mb": _peak_rss_mb(),
            "peak_rss_note": "peak resident set size of the converting process (ru_maxrss) up to the end of the conversion",
        },
    }


def write(req: ConversionRequest, prep: Prepared, manifest: dict, bundle: Path) -> None:
    """Tokenizer and manifest into the bundle being written; then check it loads and holds nothing unlisted."""
    from sdxs_edge.tokenizer import write_tokenizer_of

    write_tokenizer_of(prep.pipe.c.tokenizer, bundle / TOKENIZER_DIR)
    validate_manifest(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    check_written(bundle, manifest)


def check_cpu_classes(req: ConversionRequest, caps: Captures, manifest: dict, bundle: Path) -> None:
    """The written bundle checked on each requested CPU class (`converters.cpu_check`), recorded in its
    manifest; numerically checked bundles only."""
    if manifest["parity"]["checked"] != "numeric" or not all(
        "snr_db" in c for c in manifest["parity"]["components"].values()
    ):
        return
    from converters.cpu_check import check_classes

    host = manifest["parity"]["components"]
    inputs = {n: caps.check.inputs[n] for n in host}
    label = f"{req.target}/{req.precision}"
    manifest["parity"]["cpu_classes"] = check_classes(
        bundle, req.cpu_classes, host, inputs, caps.check.outputs, req.spec.tolerance, label
    )
    validate_manifest(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def write_layout(req: ConversionRequest, prep: Prepared, manifest: dict, bundle: Path) -> None:
    """The written bundle rearranged into the requested layout (`converters.layouts`), verified again."""
    if req.layout == "sdxs-edge":
        return
    from converters.layouts import apply_layout

    extra = apply_layout(req.layout, prep.pipe, manifest, bundle)
    validate_manifest(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    check_written(bundle, manifest, extra)


def check_written(bundle: Path, manifest: dict, extra: list[str] | tuple[str, ...] = ()) -> None:
    """The bundle as written must load through the runtimes' own reader, and hold nothing unlisted
    (`extra`: top-level names a layout adds)."""
    try:
        load_manifest(bundle, verify=True)
    except BundleError as e:
        raise SDXSError(f"the bundle written does not verify: {e}") from e
    listed = {"manifest.json", TOKENIZER_DIR, *extra}
    if "selfcheck" in manifest:
        listed.add(manifest["selfcheck"]["file"].split("/")[0])
    for c in manifest["components"].values():
        listed.add(c["file"].split("/")[0])
        listed.update(x["file"].split("/")[0] for x in c.get("external_data", []))
    stray = sorted(p.name for p in bundle.iterdir() if p.name not in listed)
    if stray:
        raise SDXSError(f"the bundle written holds unlisted files {stray}; a backend left scratch output in it")
