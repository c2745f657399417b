"""What the orchestrator hands a backend, and what a backend hands back.

A backend module (`to_onnx`, `to_executorch`, `to_coreml`) exposes the stages the converter tests drive
one by one (after executorch's backends/test/harness/tester.py): `export` -> `lower` -> an op / delegation
report -> `runner` (None where the target cannot run here), and `convert_component` chaining them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.registry import ComponentExport, PrecisionSpec

# A lowered component as a numpy callable: one array for one output, a tuple for several (the ControlNet).
Runner = Callable[[tuple[np.ndarray, ...]], "np.ndarray | tuple[np.ndarray, ...]"]


@dataclass(frozen=True)
class ConversionConfig:
    """The resolved settings of one conversion, written to the manifest under "conversion.config".

    Args:
        target: "onnx", "executorch" or "coreml".
        precision: "fp32", "fp16" or "int8".
        components: which components the bundle holds.
        resolution: image side in pixels (latents are resolution // 8).
        batch: static batch size of every input.
        dynamic: ONNX int8 only: dynamic (runtime-ranged) activations instead of calibrated static QDQ.
        palettize: Core ML int8 only: k-means palette bits (4 or 6) instead of linear int8 weights.
        delegate: ExecuTorch only: "xnnpack" (runs here) or "coreml" (lowered here, runs on Apple devices).
        calibration_prompts: how many prompts calibrate int8 (and where they came from, for the record).
        calibration_source: "default SHAPES-64 captions", a file path, or "given list".
        sensitivity: int8 static only: keep the most harmful nodes in float (see converters.sensitivity).
        sensitivity_samples: calibration samples the sensitivity pass compares on (memory grows with it).
        max_excluded_fraction: at most this share of quantized nodes is kept in float.
        onnx_calibration: ONNX static int8 activation ranges: "minmax", "minmax-average" (per-sample ranges
            averaged) or "percentile" (99.999th: clips rare outliers, but holds every activation in memory).
        max_excluded_fraction_by_component: per-component overrides of that share. The tiny decoder may go
            wholly float: its errors reach the image unfiltered, and its 17 convolutions hold 36k weights.
        sensitivity_target_offset_by_component: dB added to the precision's sensitivity target for a component.
            A ControlNet's residuals enter the U-Net, whose output the one-step rule multiplies by sigma
            (14.6 at t = 999), so its quantization error reaches the image amplified: it aims 6 dB higher.
            The U-Net aims 3 dB higher: its worst held-out sample still scored 4-7 dB above the worst
            parity sample (a small orange cross on white), so at the bare target the check refused it.
        sensitivity_shortlist: how many quantized nodes the sensitivity pass re-scores with each alone in float
            (output-referred ranking; one quantize-and-score each): all of a small component's, else a
            shortlist of the component's boundary nodes and the worst by local re-quantization SNR.
        opset: ONNX opset.
        lora: the LoRA file fused into the U-Net before lowering (None: none was).
        attention: "standard" or "split-heads" (one head at a time: the Neural Engine's layout and a
            smaller peak memory on CPU; `sdxs_edge.attention`).
        sizes: the (width, height) sizes the programs take, the first the default; () for the one
            `resolution` (`sdxs_edge.sizes`).
        max_batch: the programs take a batch from 1 to this (1: the static `batch`).
        lora_sha256: sha256 of that file.
        lora_scale: the strength it was fused with.
        lora_fused_modules: how many U-Net layers it changed.
        controlnet: the ControlNet folder lowered as the "controlnet" component ("<module>" for one passed
            in as a module; None: no ControlNet).
        controlnet_sha256: sha256 of that folder's files (`sdxs_edge.bundle.sha256_path`; None for a module).
        control_scale: the conditioning scale baked into the ControlNet component.
    """

    target: str
    precision: str
    components: tuple[str, ...]
    resolution: int
    batch: int = 1
    dynamic: bool = False
    palettize: int | None = None
    delegate: str = "xnnpack"
    calibration_prompts: int = 0
    calibration_source: str = "default SHAPES-64 captions"
    sensitivity: bool = True
    sensitivity_samples: int = 4
    max_excluded_fraction: float = 0.1
    max_excluded_fraction_by_component: tuple[tuple[str, float], ...] = (("decoder", 1.0),)
    sensitivity_target_offset_by_component: tuple[tuple[str, float], ...] = (("controlnet", 6.0), ("unet", 3.0))
    sensitivity_shortlist: int = 16
    onnx_calibration: str = "minmax"
    opset: int = 17
    lora: str | None = None
    lora_sha256: str | None = None
    lora_scale: float | None = None
    lora_fused_modules: int = 0
    controlnet: str | None = None
    controlnet_sha256: str | None = None
    control_scale: float | None = None
    attention: str = "standard"
    sizes: tuple[tuple[int, int], ...] = ()
    max_batch: int = 1

    @property
    def dynamic_shapes(self) -> bool:
        """Whether the programs take several sizes (`sizes`) or a dynamic batch (`max_batch` > 1)."""
        return len(self.sizes) > 1 or self.max_batch > 1

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["components"] = list(self.components)
        d["sizes"] = [list(s) for s in self.sizes]
        return d


@dataclass(frozen=True)
class ComponentJob:
    """One component to lower.

    Args:
        name: component name.
        module: the PyTorch wrapper (plain tensors in and out), in eval mode.
        example: example inputs (torch tensors) matching the io spec.
        inputs: io spec inputs (sdxs_edge.components.TensorSpec).
        outputs: io spec outputs.
        calib: calibration input tuples (numpy) captured from real pipeline runs.
        calib_ref: the PyTorch outputs for `calib`.
        spec: the (target, precision) registry entry.
        export: the (component, target) registry entry.
        config: the whole conversion's settings.
        work: scratch directory (deleted after the conversion).
        out: the component's path inside the bundle being written.
        score: maps (input sample, output) to what the int8 sensitivity pass compares; None = the output
            itself. A trained one-step U-Net is scored on the x0 it yields: x0 = sigma * (noise - eps)
            carries eps errors multiplied by sigma (about 14.6 at t = 999), so an eps SNR that looks fine
            can still wreck the image. (A random-weight U-Net's x0 is mostly the exact noise term, so it is
            scored on eps, the quantity its floor checks.)
        size_examples: ((width, height), example inputs) for each size the bundle takes, default first.
    """

    name: str
    module: Any
    example: tuple
    inputs: list
    outputs: list
    calib: list[tuple[np.ndarray, ...]]
    calib_ref: list[np.ndarray]
    spec: PrecisionSpec
    export: ComponentExport
    config: ConversionConfig
    work: Path
    out: Path
    score: Any = None
    size_examples: tuple = ()

    def sensitivity_figures(
        self, run, inputs: Sequence[tuple[np.ndarray, ...]], reference: Sequence[np.ndarray]
    ) -> dict:
        """`component_figures` on what the sensitivity pass scores (see `score`)."""
        from converters.parity import component_figures

        if self.score is None:
            return component_figures(run, inputs, reference)
        return component_figures(
            lambda x: self.score(x, np.asarray(run(x), np.float32)),
            inputs,
            [self.score(x, r) for x, r in zip(inputs, reference)],
        )

    def scored_references(self, inputs: Sequence[tuple[np.ndarray, ...]], reference: Sequence[np.ndarray]) -> list:
        """The references as the sensitivity pass compares them (see `score`)."""
        if self.score is None:
            return list(reference)
        return [self.score(x, r) for x, r in zip(inputs, reference)]

    def feeds(self, sample: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        """Named inputs for one sample, in the io spec's dtypes."""
        return {s.name: np.ascontiguousarray(x, dtype=s.dtype) for s, x in zip(self.inputs, sample)}


@dataclass
class ComponentResult:
    """A lowered component inside the bundle.

    Args:
        file: its file (or .mlpackage directory) name relative to the bundle.
        report: JSON-ready facts of the lowering (op counts, delegation, excluded nodes, ...).
        runner: runs the lowered file on numpy inputs here, or None where the target cannot run here.
        extra_files: further files it needs (e.g. ONNX external data), relative to the bundle.
        structural: for targets that cannot run here, the structural check's findings.
    """

    file: str
    report: dict
    runner: Runner | None
    extra_files: list[str] = field(default_factory=list)
    structural: dict | None = None


def export_dims(job: ComponentJob, all_sizes: bool = True) -> tuple:
    """torch.export dynamic shapes of a bundle of several sizes or batches, one entry per input: the batch
    up to `max_batch`; with `all_sizes`, also the height and width of 4-D inputs (latents, and the
    encoder's image at 8x) over the range of the bundle's sizes, in steps of the largest latent multiple
    they share (that range is what calibration and the sensitivity pass run on)."""
    import math

    from torch.export import Dim

    cfg = job.config
    batch = Dim("batch", min=1, max=cfg.max_batch) if cfg.max_batch > 1 else None
    hs, ws = [h // 8 for _, h in cfg.sizes], [w // 8 for w, _ in cfg.sizes]
    step = math.gcd(*hs, *ws) if all_sizes and len(cfg.sizes) > 1 else 0
    specs = []
    for s in job.inputs:
        d = {0: batch} if batch is not None else {}
        if step and len(s.shape) == 4:
            k = step * (s.shape[2] // hs[0])  # 1 for a latent, 8 for an image
            d[2] = k * Dim(f"{s.name}_h", min=min(hs) // step, max=max(hs) // step)
            d[3] = k * Dim(f"{s.name}_w", min=min(ws) // step, max=max(ws) // step)
        specs.append(d or None)
    return tuple(specs)
