"""`convert`: model (preset, folder or loaded pipeline) -> a verified bundle, written atomically.

Stages: validate the request (and the LoRA file and ControlNet folder, if any) -> load the model (and
fuse the LoRA into its U-Net, a copy for a pipeline passed in; the fused U-Net is the reference from then
on; a ControlNet built for another U-Net is refused here, before any lowering) -> capture calibration and
parity tensors from real one-step runs (with a ControlNet, on control images made from the prompts: see
`converters.calibration`) -> per component export / lower / report / run -> per-component and end-to-end
parity against PyTorch -> tokenizer + manifest -> atomic rename. Any failure (including a ParityError or
an interrupt) leaves no bundle behind and an existing one untouched.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import os
import platform
import resource
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from converters import calibration, parity
from converters.base import ComponentJob, ComponentResult, ConversionConfig
from converters.registry import DELEGATES, ONNX_CALIBRATIONS, PALETTE_BITS, UnsupportedConversion, component_export, precision_spec
from converters.sensitivity import refusal_detail
from sdxs_edge.atomic import atomic_dir, scratch_dir
from sdxs_edge.bundle import COMPONENT_NAMES, FORMAT, FORMAT_VERSION, REQUIRED_COMPONENTS, TARGETS, BundleError, load_manifest, sha256_path, validate_manifest
from sdxs_edge.errors import ParityError, SDXSError
from sdxs_edge.weights import modules_sha256

BACKENDS = {"onnx": "converters.to_onnx", "executorch": "converters.to_executorch", "coreml": "converters.to_coreml"}
TOKENIZER_DIR = "tokenizer"


def backend(target: str):
    """The backend module of a target (imported lazily: each pulls its own heavy libraries)."""
    return importlib.import_module(BACKENDS[target])


def check_request(
    target: str,
    precision: str,
    components: Sequence[str],
    dynamic: bool,
    palettize: int | None,
    delegate: str,
    batch: int,
    resolution: int | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    controlnet=None,
    control_scale: float = 1.0,
) -> tuple[str, ...]:
    """Reject unsupported combinations before any model is loaded; returns components in bundle order.

    `components` None means every component the request has: text_encoder, unet, decoder, and controlnet
    when a ControlNet is given (any non-None `controlnet`: a folder or a module).
    """
    if target not in TARGETS:
        raise UnsupportedConversion(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    precision_spec(target, precision)
    if components is None:
        components = [c for c in COMPONENT_NAMES if c in REQUIRED_COMPONENTS or (c == "controlnet" and controlnet is not None)]
    if isinstance(components, str):
        components = [components]
    comps = list(components)
    if not comps:
        raise UnsupportedConversion(f"no components given; choose from {', '.join(COMPONENT_NAMES)}")
    unknown = [c for c in comps if c not in COMPONENT_NAMES]
    if unknown:
        raise UnsupportedConversion(f"unknown component {unknown[0]!r}; components: {', '.join(COMPONENT_NAMES)}")
    if len(set(comps)) != len(comps):
        raise UnsupportedConversion(f"component listed twice: {comps}")
    if dynamic and (target, precision) != ("onnx", "int8"):
        raise UnsupportedConversion(f"dynamic quantization is an ONNX int8 option, not {target}/{precision}")
    if palettize is not None and ((target, precision) != ("coreml", "int8") or palettize not in PALETTE_BITS):
        raise UnsupportedConversion(f"palettize={palettize} needs target coreml, precision int8 and 4 or 6 bits")
    if delegate not in DELEGATES:
        raise UnsupportedConversion(f"unknown ExecuTorch delegate {delegate!r}; delegates: {', '.join(DELEGATES)}")
    if delegate != "xnnpack" and target != "executorch":
        raise UnsupportedConversion(f"delegate={delegate} is an ExecuTorch option, not {target}")
    if (target, delegate, precision) == ("executorch", "coreml", "int8"):
        raise UnsupportedConversion("executorch int8 is XNNPACK-only here; for int8 on Apple devices use target coreml precision int8")
    if batch < 1:
        raise UnsupportedConversion(f"batch must be >= 1, got {batch}")
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise UnsupportedConversion(f"resolution must be a positive multiple of 8, got {resolution}")
    try:
        scale_ok = not isinstance(lora_scale, bool) and math.isfinite(float(lora_scale))
    except (TypeError, ValueError):
        scale_ok = False
    if not scale_ok:
        raise UnsupportedConversion(f"lora_scale must be a finite number, got {lora_scale!r}")
    if lora is None and lora_scale != 1.0:
        raise UnsupportedConversion(f"lora_scale={lora_scale} needs a LoRA file (lora=PATH, --lora PATH)")
    if lora is not None and "unet" not in comps:
        raise UnsupportedConversion("a LoRA is fused into the U-Net; add unet to the components")
    try:
        scale_ok = not isinstance(control_scale, bool) and math.isfinite(float(control_scale))
    except (TypeError, ValueError):
        scale_ok = False
    if not scale_ok:
        raise UnsupportedConversion(f"control_scale must be a finite number, got {control_scale!r}")
    if controlnet is None and control_scale != 1.0:
        raise UnsupportedConversion(f"control_scale={control_scale} needs a ControlNet (controlnet=PATH, --controlnet PATH)")
    if controlnet is None and "controlnet" in comps:
        raise UnsupportedConversion("the controlnet component needs a ControlNet (controlnet=PATH, --controlnet PATH)")
    if controlnet is not None and "controlnet" in comps and "unet" not in comps:
        raise UnsupportedConversion("the ControlNet's residuals feed the U-Net; add unet to the components")
    if controlnet is not None and not {"controlnet", "unet"} & set(comps):
        raise UnsupportedConversion("a ControlNet changes the controlnet and unet components only; add them to the components")
    return tuple(c for c in COMPONENT_NAMES if c in comps)


def _one_step_x0(c):
    """(U-Net input sample, output) -> the one-step x0 (the U-Net wrapper runs at the one-step timestep)."""
    from sdxs_edge import sampler

    def score(sample, output):
        latent = np.asarray(sample[0], np.float32)
        return np.asarray(sampler.denoised(output, latent / np.float32(c.input_scale), c), np.float32)

    return score


def weights_sha256(pipe) -> str:
    """sha256 of the network weights as loaded: per module (text_encoder, unet, vae) and sorted tensor name,
    the name, dtype, shape and raw bytes. The same for a preset, a folder or a pipeline instance."""
    return modules_sha256(pipe.c.modules())


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (1 << 20) if platform.system() == "Darwin" else r / 1024, 1)


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise SDXSError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if not out.is_dir() or not ((out / "manifest.json").is_file() or not any(out.iterdir())):
        # --overwrite replaces bundles only: never delete an unrelated file or folder by mistake.
        raise SDXSError(f"{out} exists and is not a bundle (no manifest.json); refusing to replace it, choose another --out")


def _versions(target: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = {"onnx": ("onnx", "onnxruntime"), "executorch": ("executorch", "torchao"), "coreml": ("coremltools",)}[target]
    out = {}
    for n in ("torch", "diffusers", "transformers") + names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def convert(
    model,
    target: str,
    precision: str,
    out: str | os.PathLike,
    components: Sequence[str] | None = None,
    resolution: int | None = None,
    calibration_prompts: str | os.PathLike | Sequence[str] | int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    dynamic: bool = False,
    palettize: int | None = None,
    delegate: str = "xnnpack",
    batch: int = 1,
    sensitivity: bool = True,
    sensitivity_shortlist: int | None = None,
    max_float_fraction: float | None = None,
    onnx_calibration: str = "minmax",
    trained: bool | None = None,
    seed: int = 0,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    controlnet=None,
    control_scale: float = 1.0,
    attention: str = "standard",
) -> Path:
    """Convert a model into a bundle for one runtime target and check it against PyTorch.

    Args:
        model: a preset name, a diffusers folder, a hub id, or a loaded `SDXSPipeline`.
        target: "onnx", "executorch" or "coreml".
        precision: "fp32", "fp16" or "int8" (see `converters.registry.PRECISION_SPECS` for the pairs).
        out: the bundle directory to create.
        components: any of "text_encoder", "controlnet", "unet", "decoder" (default: all three, and
            controlnet when `controlnet` is given).
        resolution: image side in pixels (default the model's; a multiple of 8 the U-Net can halve).
        calibration_prompts: int8 calibration prompts: a text file (one per line), a list, or a number of
            SHAPES-64 captions spread over the grammar (e.g. 128: a fused LoRA may need more); default 32
            SHAPES-64 captions.
        overwrite: replace an existing bundle at `out`.
        progress: show a tqdm bar per stage.
        dynamic: ONNX int8 only: dynamic int8 (weights only calibrated) instead of static QDQ.
        palettize: Core ML int8 only: 6- or 4-bit k-means weight palettes instead of linear int8.
        delegate: ExecuTorch only: "xnnpack" (default; runs and is checked here) or "coreml".
        batch: static batch size of the bundle's inputs.
        sensitivity: int8 static: keep the most harmful nodes in float (reported in the manifest).
        sensitivity_shortlist: nodes the sensitivity pass re-scores one by one (default 16; each costs one
            quantize-and-score, minutes at 512x512 for a 316M U-Net).
        max_float_fraction: share of quantized nodes the pass may keep in float (default 0.1; the tiny
            decoder may always go wholly float).
        onnx_calibration: ONNX static int8 activation ranges: "minmax", "minmax-average" (per-sample ranges
            averaged) or "percentile" (needs every activation in memory at once: small models only).
        trained: whether the weights are trained (enforces the int8 image PSNR floor); default: False for
            presets (random weights), True for folders and hub ids.
        seed: weight seed when `model` is a preset.
        lora: a U-Net LoRA (safetensors, see `sdxs_edge.lora`) to fuse into the U-Net before capture and
            lowering; the fused U-Net is then the parity reference. A pipeline passed in is left as it
            was (the LoRA goes into a copy of its U-Net). Recorded under "conversion.config".
        lora_scale: the LoRA's strength (W + lora_scale * alpha / rank * B @ A).
        controlnet: a ControlNet folder (`ControlNetModel.save_pretrained`) or a loaded `ControlNetModel`
            built for this U-Net (else refused before any lowering). It is lowered as the "controlnet"
            component and the U-Net takes its residuals as inputs; calibration and parity use canny edges
            of SHAPES-64 renders of the prompts as control images. Its folder and sha256 are recorded
            under "source.controlnet" and "conversion.config".
        control_scale: the ControlNet's conditioning scale, baked into the controlnet component.
        attention: "standard" (diffusers' fused attention) or "split-heads" (each head its own Q K^T,
            softmax and product with V, as Apple's ml-stable-diffusion lays attention out for the Neural
            Engine; on CPU it caps the largest attention map at one head's). Applied to copies of the U-Net,
            VAE and ControlNet: a pipeline passed in is left as it was. Recorded under "conversion.config".

    Returns:
        the bundle path.
    """
    t_start = time.perf_counter()
    comps = check_request(target, precision, components, dynamic, palettize, delegate, batch, resolution, lora, lora_scale, controlnet, control_scale)
    if onnx_calibration not in ONNX_CALIBRATIONS:
        raise UnsupportedConversion(f"onnx_calibration must be one of {', '.join(ONNX_CALIBRATIONS)}; got {onnx_calibration!r}")
    from sdxs_edge.attention import ATTENTION_VARIANTS

    if attention not in ATTENTION_VARIANTS:
        raise UnsupportedConversion(f"attention must be one of {', '.join(ATTENTION_VARIANTS)}; got {attention!r}")
    spec = precision_spec(target, precision)
    out = Path(out)
    _check_out(out, overwrite)
    calibrate = precision == "int8" and not dynamic and target != "coreml"
    prompts = calibration.resolve_prompts(calibration_prompts) if (calibrate or calibration_prompts is not None) else []
    if calibration_prompts is None:
        source = "default SHAPES-64 captions"
    elif isinstance(calibration_prompts, int) and not isinstance(calibration_prompts, bool):
        source = f"{len(prompts)} SHAPES-64 captions"
    elif isinstance(calibration_prompts, (str, os.PathLike)):
        source = str(calibration_prompts)
    else:
        source = "given list"
    lora_weights, lora_file, lora_sha256 = None, None, None
    if lora is not None:  # a bad LoRA file fails here, before the model is loaded
        from sdxs_edge.lora import load_lora, resolve_lora_path

        lora_file = resolve_lora_path(lora)
        lora_weights = load_lora(lora_file)
        lora_sha256 = sha256_path(lora_file)
    cn_path, cn_sha256 = None, None
    if isinstance(controlnet, (str, os.PathLike)):  # a bad folder fails here, before the model is loaded
        from sdxs_edge.controlnet import load_controlnet

        cn_path = Path(controlnet)
        controlnet = load_controlnet(cn_path)
        cn_sha256 = sha256_path(cn_path)
    back = backend(target)  # import errors of an uninstalled extra surface here, before loading the model

    from tqdm.auto import tqdm

    stages = ["load", "capture", *comps, "parity", "write"]
    bar = tqdm(total=len(stages), desc=f"convert {target}/{precision}", unit="stage", disable=not progress, leave=True)
    timings: dict[str, float] = {}

    def stage(name: str):
        bar.set_postfix_str(name)
        return time.perf_counter()

    def done(name: str, t0: float):
        timings[name] = round(time.perf_counter() - t0, 3)
        bar.update(1)

    try:
        t0 = stage("load")
        import torch

        from sdxs_edge import components as C
        from sdxs_edge.pipeline import SDXSPipeline
        from sdxs_edge.presets import PRESETS

        if isinstance(model, SDXSPipeline):
            pipe = model
        else:
            pipe = SDXSPipeline.load(model, seed=seed)
        source_sha256 = weights_sha256(pipe)  # of the model as given, before any LoRA
        # Never modify the caller's pipeline: what this conversion changes goes into copies of its own.
        owned: set[str] = set() if pipe is model else {"unet", "vae"}

        def own(*names: str) -> None:
            nonlocal pipe
            todo = [n for n in names if n not in owned]
            if todo:
                base = pipe
                pipe = SDXSPipeline(dataclasses.replace(base.c, **{n: copy.deepcopy(getattr(base.c, n)) for n in todo}), name=base.name)
                pipe.default_steps, pipe.default_guidance = base.default_steps, base.default_guidance
                owned.update(todo)

        fused: list[str] = []
        if lora_weights is not None:
            from sdxs_edge.lora import fuse_lora

            own("unet")
            fused = fuse_lora(pipe.c.unet, lora_weights, scale=lora_scale)
        if attention != "standard":
            from sdxs_edge.attention import set_attention

            own("unet", "vae")
            set_attention(pipe.c.unet, attention)
            set_attention(pipe.c.vae, attention)
            if controlnet is not None:
                if cn_path is None:  # a module the caller passed in
                    controlnet = copy.deepcopy(controlnet)
                set_attention(controlnet, attention)
        if controlnet is not None:  # one line naming the mismatch, before any capture or lowering
            from sdxs_edge.controlnet import check_controlnet

            check_controlnet(controlnet, pipe.c.unet)
        if trained is None:
            trained = pipe.name not in PRESETS
        res = resolution or pipe.resolution
        down = 2 ** (len(pipe.c.unet.config.block_out_channels) - 1)
        if res % (8 * down):
            raise SDXSError(f"resolution {res} must be a multiple of {8 * down} for this U-Net ({len(pipe.c.unet.config.block_out_channels)} stages)")
        config = ConversionConfig(
            target=target,
            precision=precision,
            components=comps,
            resolution=res,
            batch=batch,
            dynamic=dynamic,
            palettize=palettize,
            delegate=delegate,
            calibration_prompts=len(prompts) if calibrate else 0,
            calibration_source=source if calibrate else "not used",
            sensitivity=sensitivity,
            **({"sensitivity_shortlist": int(sensitivity_shortlist)} if sensitivity_shortlist is not None else {}),
            **({"max_excluded_fraction": float(max_float_fraction)} if max_float_fraction is not None else {}),
            onnx_calibration=onnx_calibration,
            lora=str(lora_file) if lora_file is not None else None,
            lora_sha256=lora_sha256,
            lora_scale=float(lora_scale) if lora_file is not None else None,
            lora_fused_modules=len(fused),
            controlnet=(str(cn_path) if cn_path is not None else "<module>") if controlnet is not None else None,
            controlnet_sha256=cn_sha256,
            control_scale=float(control_scale) if controlnet is not None else None,
            attention=attention,
        )
        modules = C.wrappers(pipe, controlnet, control_scale)
        specs = C.io_specs(pipe, batch, res, controlnet)
        constants = pipe.one_step_constants()
        done("load", t0)

        t0 = stage("capture")
        calib = calibration.capture(pipe, modules, prompts, seed0=0, batch=batch, resolution=res) if calibrate else None
        check = calibration.capture(pipe, modules, calibration.PARITY_PROMPTS, seed0=calibration.PARITY_SEED0, batch=batch, resolution=res)
        done("capture", t0)

        out.parent.mkdir(parents=True, exist_ok=True)
        results: dict[str, ComponentResult] = {}
        par_components: dict[str, dict] = {}
        with atomic_dir(out, overwrite=overwrite) as tmp, scratch_dir(out) as work:
            for name in comps:
                t0 = stage(name)
                ins, outs = specs[name]
                cal = calib or check  # fp32/fp16 never quantize; they get the parity tensors as examples
                job = ComponentJob(
                    name=name,
                    module=modules[name],
                    example=tuple(torch.from_numpy(x) for x in check.inputs[name][0]),
                    inputs=ins,
                    outputs=outs,
                    calib=cal.inputs[name],
                    calib_ref=cal.outputs[name],
                    spec=spec,
                    export=component_export(name, target),
                    config=config,
                    work=Path(work),
                    out=Path(tmp) / component_export(name, target).file,
                    score=_one_step_x0(pipe.one_step_constants()) if name == "unet" and trained else None,
                )
                result = back.convert_component(job)
                label = f"{target}/{precision}"
                if result.runner is not None:
                    figs = parity.component_figures(result.runner, check.inputs[name], check.outputs[name])
                    try:
                        par_components[name] = parity.check_component(name, figs, spec.tolerance, label)
                    except ParityError as e:
                        raise ParityError(f"{e}{refusal_detail(result.report)}") from None
                else:
                    par_components[name] = {"checked": "structural", **(result.structural or {})}
                results[name] = result
                done(name, t0)

            t0 = stage("parity")
            runnable = all(r.runner is not None for r in results.values())
            needed = set(modules)  # the three, and the ControlNet when there is one
            if set(comps) == needed and runnable:
                e2e = parity.check_end_to_end(parity.end_to_end({n: r.runner for n, r in results.items()}, check, constants), spec.tolerance, trained, f"{target}/{precision}")
            else:
                why = f"not all {'three' if len(needed) == 3 else 'four (with the ControlNet)'} components are in the bundle" if set(comps) != needed else "the lowered models cannot run on this machine"
                e2e = {"image_psnr_db": None, "enforced": False, "why_not_enforced": f"not computed: {why}"}
            done("parity", t0)

            t0 = stage("write")
            from sdxs_edge.tokenizer import write_clip_tokenizer

            write_clip_tokenizer(Path(tmp) / TOKENIZER_DIR, pad_token=str(pipe.c.tokenizer.pad_token))
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "source": {
                    "model": pipe.name,
                    "sha256": source_sha256,
                    "sha256_of": "network weights as loaded (text_encoder, unet, vae state dicts; name, dtype, shape, bytes)",
                    "trained": bool(trained),
                    # weights of a preset are random with this seed; None for a folder or a pipeline passed in
                    "preset_seed": seed if pipe.name in PRESETS and not isinstance(model, SDXSPipeline) else None,
                    "unet_class": type(pipe.c.unet).__name__,
                    "vae_class": type(pipe.c.vae).__name__,
                    **({"controlnet": _controlnet_record(controlnet, cn_path, cn_sha256, control_scale)} if controlnet is not None else {}),
                },
                "target": target,
                "precision": precision,
                "resolution": res,
                "batch": batch,
                "sampler": constants.to_dict(),
                "tokenizer": {"dir": TOKENIZER_DIR, "max_length": int(pipe.c.tokenizer.model_max_length), "pad_token": str(pipe.c.tokenizer.pad_token)},
                "components": {},
                "parity": {
                    "checked": "numeric" if spec.runs_here and delegate == "xnnpack" else "structural",
                    "reference": "PyTorch float32 wrappers (sdxs_edge.components) on the same inputs",
                    "prompts": list(calibration.PARITY_PROMPTS),
                    **({"control_images": CONTROL_IMAGES} if controlnet is not None else {}),
                    "seeds": [calibration.PARITY_SEED0 + i for i in range(len(check))],
                    "null_db_means": "exact match (infinite SNR / PSNR)",
                    "components": par_components,
                    "end_to_end": e2e,
                },
                "conversion": {
                    "config": config.to_dict(),
                    "registry": {"summary": spec.summary, "floor_snr_db": spec.tolerance.snr_db, "floor_image_psnr_db": spec.tolerance.image_psnr_db},
                    "versions": _versions(target),
                    "components": {n: {**r.report, "tracer": component_export(n, target).tracer} for n, r in results.items()},
                },
            }
            for name, r in results.items():
                ins, outs = specs[name]
                entry = {"file": r.file, "sha256": sha256_path(Path(tmp) / r.file), "inputs": [s.to_dict() for s in ins], "outputs": [s.to_dict() for s in outs]}
                if r.extra_files:
                    entry["external_data"] = [{"file": f, "sha256": sha256_path(Path(tmp) / f)} for f in r.extra_files]
                manifest["components"][name] = entry
            manifest["conversion"]["seconds"] = round(time.perf_counter() - t_start, 3)
            manifest["conversion"]["stage_seconds"] = timings
            manifest["conversion"]["peak_rss_mb"] = _peak_rss_mb()
            manifest["conversion"]["peak_rss_note"] = "peak resident set size of the converting process (ru_maxrss) up to the end of the conversion"
            validate_manifest(manifest)
            (Path(tmp) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            _check_written(Path(tmp), manifest)
            done("write", t0)
    finally:
        bar.close()
    return out


CONTROL_IMAGES = "canny edges of a SHAPES-64 render of each prompt's scene (a random scene for other prompts), sdxs_edge.control.prompt_controls seeded by the sample's seed"


def _controlnet_record(controlnet, path: Path | None, files_sha256: str | None, scale: float) -> dict:
    """The manifest's "source.controlnet": where the ControlNet came from, so the PyTorch reference can
    load it again (`runtimes.torch_session`), and what it was."""
    return {
        "model": str(path) if path is not None else None,
        "sha256": files_sha256,
        "sha256_of": "the ControlNet folder's files (sdxs_edge.bundle.sha256_path); null for a module passed in",
        "weights_sha256": modules_sha256({"controlnet": controlnet}),
        "weights_sha256_of": "ControlNet weights as loaded (state dict; name, dtype, shape, bytes)",
        "class": type(controlnet).__name__,
        "conditioning_embedding_out_channels": list(controlnet.config.conditioning_embedding_out_channels),
        "control_scale": float(scale),
        "control_image": "float32 (B, 3, H, W) in [0, 1], white canny edges on black (sdxs_edge.control)",
    }


def _check_written(bundle: Path, manifest: dict) -> None:
    """The bundle as written must load through the runtimes' own reader, and hold nothing unlisted."""
    try:
        load_manifest(bundle, verify=True)
    except BundleError as e:
        raise SDXSError(f"the bundle written does not verify: {e}") from e
    listed = {"manifest.json", TOKENIZER_DIR}
    for c in manifest["components"].values():
        listed.add(c["file"])
        listed.update(x["file"] for x in c.get("external_data", []))
    stray = sorted(p.name for p in bundle.iterdir() if p.name not in listed)
    if stray:
        raise SDXSError(f"the bundle written holds unlisted files {stray}; a backend left scratch output in it")

