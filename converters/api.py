"""`convert`: model (preset, folder or loaded pipeline) -> a verified bundle, written atomically.

`run` is the whole conversion as a list of named stages (`converters.stages`), read top to bottom:
a checked `ConversionRequest` -> sources (LoRA file, ControlNet folder) -> load -> prepare (LoRA fused
into a copy of the U-Net, attention layout, a ControlNet built for another U-Net refused, all before
any lowering) -> capture (calibration and parity tensors from real one-step runs; with a ControlNet, on
control images made from the prompts: see `converters.calibration`) -> per component lower (the
backend's export -> quantize -> lower; the largest component in a second process, `converters.parallel`)
and check -> end-to-end parity -> write (tokenizer, manifest,
verification) -> atomic rename. Any failure (including a ParityError or an interrupt) leaves no bundle
behind and an existing one untouched.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from converters import stages as S
from converters.parallel import lower_all, parameters, side_by_side
from converters.request import ConversionRequest, check_request
from converters.stages import BACKENDS, CONTROL_IMAGES, TOKENIZER_DIR, backend, weights_sha256
from sdxs_edge.atomic import atomic_dir, scratch_dir
from sdxs_edge.errors import SDXSError

__all__ = [
    "convert",
    "run",
    "check_request",
    "ConversionRequest",
    "BACKENDS",
    "backend",
    "weights_sha256",
    "CONTROL_IMAGES",
    "TOKENIZER_DIR",
]


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise SDXSError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if not out.is_dir() or not ((out / "manifest.json").is_file() or not any(out.iterdir())):
        # --overwrite replaces bundles only: never delete an unrelated file or folder by mistake.
        raise SDXSError(
            f"{out} exists and is not a bundle (no manifest.json); refusing to replace it, choose another --out"
        )


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
    cpu_classes: Sequence[str] = ("host",),
    layout: str = "sdxs-edge",
    encoder: bool | None = None,
    sizes=None,
    max_batch=1,
    jobs: int = 0,
) -> Path:
    """Convert a model into a bundle for one runtime target, checked against PyTorch; returns the bundle path.

    Args:
        model: a preset name, a diffusers folder, a hub id, or a loaded `SDXSPipeline`.
        target: "onnx", "executorch" or "coreml".
        precision: "fp32", "fp16" or "int8" (see `converters.registry.PRECISION_SPECS` for the pairs).
        out: the bundle directory to create.
        components: any of "encoder", "text_encoder", "controlnet", "unet", "decoder" (default: the three,
            controlnet when `controlnet` is given, encoder as `encoder` says).
        resolution: image side in pixels (default the model's; a multiple of 8 the U-Net can halve).
        calibration_prompts: int8 calibration prompts: a text file (one per line), a list, or a number of
            SHAPES-64 captions spread over the grammar (e.g. 128: a fused LoRA may need more); default 32.
        overwrite: replace an existing bundle at `out`. progress: show a tqdm bar per stage.
        dynamic: ONNX int8 only: dynamic int8 (weights only calibrated) instead of static QDQ.
        palettize: Core ML int8 only: 6- or 4-bit k-means weight palettes instead of linear int8.
        delegate: ExecuTorch only: "xnnpack" (default; runs and is checked here) or "coreml".
        batch: static batch size of the bundle's inputs.
        sensitivity: int8 static: keep the most harmful nodes in float (reported in the manifest).
        sensitivity_shortlist: nodes the sensitivity pass re-scores one by one (default 16).
        max_float_fraction: share of quantized nodes the pass may keep in float (default 0.1; the tiny
            decoder may always go wholly float).
        onnx_calibration: ONNX static int8 activation ranges: "minmax", "minmax-average" (per-sample ranges
            averaged) or "percentile" (needs every activation in memory at once: small models only).
        trained: whether the weights are trained (enforces the int8 image PSNR floor); default: False for
            presets (random weights), True for folders and hub ids.
        seed: weight seed when `model` is a preset.
        lora: a U-Net LoRA (safetensors, `sdxs_edge.lora`) fused into a copy of the U-Net before capture;
            the fused U-Net is then the parity reference. Recorded under "conversion.config".
        lora_scale: the LoRA's strength (W + lora_scale * alpha / rank * B @ A).
        controlnet: a ControlNet folder or `ControlNetModel` built for this U-Net, lowered as the
            "controlnet" component (the U-Net takes its residuals); calibration and parity use canny edges
            of SHAPES-64 renders of the prompts. Recorded under "source.controlnet".
        control_scale: the ControlNet's conditioning scale, baked into the controlnet component.
        attention: "standard" (diffusers' fused attention) or "split-heads" (one head at a time, Apple's
            layout for the Neural Engine; `sdxs_edge.attention`), applied to copies of the modules.
        cpu_classes: CPU classes to check the bundle on ("host" and `sdxs_edge.cpu.EMULATED`; `cpu_check`).
        layout: "sdxs-edge" (default), "optimum" (ONNX) or "react-native-executorch" (`converters.layouts`).
        encoder: lower the VAE's encoder for image-to-image (default: for a trained model without ControlNet,
            in the sdxs-edge layout).
        sizes, max_batch: image sizes ("WxH,WxH" or pairs; the first the default) and a dynamic batch bound.
        jobs: 1 lowers one component at a time; 0 (default): the largest beside the rest (`converters.parallel`).
    """
    return run(ConversionRequest(
        model, target, precision, out, components, resolution, calibration_prompts, overwrite, progress, dynamic,
        palettize, delegate, batch, sensitivity, sensitivity_shortlist, max_float_fraction, onnx_calibration,
        trained, seed, lora, lora_scale, controlnet, control_scale, attention, tuple(cpu_classes), layout, encoder,
        sizes, max_batch, jobs,
    ))  # fmt: skip


class _Stages:
    """The progress bar (one tick per stage) and each stage's wall-clock seconds."""

    def __init__(self, req: ConversionRequest):
        from tqdm.auto import tqdm

        names = ["load", "capture", *req.components, "parity", "write"]
        self.bar = tqdm(
            total=len(names),
            desc=f"convert {req.target}/{req.precision}",
            unit="stage",
            disable=not req.progress,
            leave=True,
        )
        self.seconds: dict[str, float] = {}

    def start(self, name: str) -> None:
        self.bar.set_postfix_str(name)
        self.name, self.t0 = name, time.perf_counter()

    def done(self) -> None:
        self.seconds[self.name] = round(time.perf_counter() - self.t0, 3)
        self.bar.update(1)

    def lowered(self, name: str, seconds: float) -> None:
        """A component lowered in `seconds` of its own (components may be lowered side by side)."""
        self.seconds[name] = round(seconds, 3)
        self.bar.update(1)
        self.bar.set_postfix_str(f"{name} done")


def run(req: ConversionRequest) -> Path:
    """Run a checked request through the stages; returns the bundle path."""
    t_start = time.perf_counter()
    _check_out(req.out, req.overwrite)
    prompts = req.prompts()
    src = S.read_sources(req)
    backend(req.target)  # import errors of an uninstalled extra surface here, before loading the model
    st = _Stages(req)
    try:
        st.start("load")
        from sdxs_edge import components as C

        prep = S.prepare(req, S.load(req), src)
        config = S.conversion_config(req, prep, src, len(prompts))
        modules = C.wrappers(prep.pipe, prep.controlnet, req.control_scale, req.has_encoder)
        specs = C.io_specs(prep.pipe, req.batch, prep.resolution, prep.controlnet, req.has_encoder, size=prep.sizes[0])
        st.done()
        st.start("capture")
        caps = S.capture(req, prep, modules, prompts)
        st.done()
        req.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(req.out, overwrite=req.overwrite) as tmp, scratch_dir(req.out) as work:
            jobs = {
                n: S.component_job(req, prep, n, modules, specs, caps, config, Path(work), Path(tmp))
                for n in req.components
            }
            parallel = side_by_side(req.target, len(jobs), req.jobs, max(map(parameters, jobs.values())))
            st.bar.set_postfix_str(f"lowering {', '.join(req.components)}" + (" (two processes)" if parallel else ""))
            b = backend(req.target)
            results = lower_all(jobs, b.convert_component, getattr(b, "runner_for", None), parallel, st.lowered)
            checks = {name: S.check_component(req, name, results[name], caps) for name in req.components}
            st.start("parity")
            e2e = S.check_end_to_end(req, prep, results, modules, caps)
            selfcheck = S.write_selfcheck(req, prep, caps, Path(tmp))
            st.done()
            st.start("write")
            low = S.Lowered(results, checks, e2e, specs, config, len(caps.check) // len(prep.sizes), selfcheck)
            manifest = S.build_manifest(req, prep, src, low, Path(tmp), st.seconds, t_start)
            S.write(req, prep, manifest, Path(tmp))
            S.check_cpu_classes(req, caps, manifest, Path(tmp))
            S.write_layout(req, prep, manifest, Path(tmp))
            st.done()
    finally:
        st.bar.close()
    return req.out
