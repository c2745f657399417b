"""The export registry: one table of what each (target, precision) pair and (component, target) pair means.

Everything a converter decides per target lives here as data (after huggingface/optimum's
exporters/tasks.py): which file a component becomes, which tracer feeds the backend, which precisions a
target accepts, and the numerical floor every conversion is checked against before a bundle is written
(arXiv 2403.16627 targets on-device one-step generation, so the bundle must match PyTorch, not just
load). Nothing here imports a backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from sdxs_edge.bundle import COMPONENT_NAMES, PRECISIONS, TARGETS
from sdxs_edge.errors import SDXSError
from sdxs_edge.floors import FLOORS


class UnsupportedConversion(SDXSError):
    """A target / precision / option combination that no converter implements."""


@dataclass(frozen=True)
class Tolerance:
    """Numerical floors a lowered model must meet against the PyTorch reference on the same inputs.

    Args:
        snr_db: per-component output SNR floor in dB (ParityError below it).
        image_psnr_db: end-to-end uint8 image PSNR floor in dB, or None to record the figure only. It is
            enforced only for trained models: a random-weight preset's images are noise-like and amplify
            any rounding, so there the per-component floors are the contract.
    """

    snr_db: float
    image_psnr_db: float | None = None


def _tolerance(precision: str) -> Tolerance:
    """The converters' check of a precision, from the one table of floors (`sdxs_edge.floors`)."""
    f = FLOORS[precision]
    return Tolerance(snr_db=f.component_snr_db, image_psnr_db=f.image_psnr_db if f.image_at_conversion else None)


FP32, FP16, INT8 = _tolerance("fp32"), _tolerance("fp16"), _tolerance("int8")


@dataclass(frozen=True)
class PrecisionSpec:
    """A supported (target, precision) pair.

    Args:
        target: "onnx", "executorch" or "coreml".
        precision: "fp32", "fp16" or "int8".
        tolerance: the floor its parity check enforces.
        runs_here: whether the lowered model can be executed on this (Linux, CPU) machine; when False the
            check is structural (names, shapes, dtypes, delegation) and the manifest says so.
        summary: one line for `--help` and reports.
        sensitivity_target_db: for int8, the per-component SNR the sensitivity pass aims for by keeping the
            most harmful nodes in float: the floor plus 3 dB, a margin for prompts calibration never saw
            (each exclusion step re-quantizes the component, so a higher target costs conversion time).
    """

    target: str
    precision: str
    tolerance: Tolerance
    runs_here: bool
    summary: str
    sensitivity_target_db: float | None = None


PRECISION_SPECS: Mapping[tuple[str, str], PrecisionSpec] = MappingProxyType(
    {
        (s.target, s.precision): s
        for s in (
            PrecisionSpec("onnx", "fp32", FP32, True, "ONNX opset 17, static shapes, float32"),
            PrecisionSpec("onnx", "fp16", FP16, True, "ONNX float16 weights and compute, float32 inputs/outputs"),
            PrecisionSpec(
                "onnx",
                "int8",
                INT8,
                True,
                "ONNX static QDQ int8 (per-channel weights, calibrated activations), sensitive nodes kept in fp32; dynamic=True for dynamic int8",
                sensitivity_target_db=28.0,
            ),
            PrecisionSpec("executorch", "fp32", FP32, True, "ExecuTorch .pte, XNNPACK-delegated float32"),
            PrecisionSpec(
                "executorch",
                "fp16",
                FP16,
                True,
                "ExecuTorch .pte, XNNPACK-delegated float16 compute, float32 inputs/outputs",
            ),
            PrecisionSpec(
                "executorch",
                "int8",
                INT8,
                True,
                "ExecuTorch .pte, PT2E static int8 with the XNNPACK quantizer (per-channel weights), sensitive nodes kept in fp32",
                sensitivity_target_db=28.0,
            ),
            PrecisionSpec(
                "coreml",
                "fp32",
                FP32,
                False,
                "Core ML ML Program (iOS17), float32 compute; structural check only (no Core ML prediction is run)",
            ),
            PrecisionSpec(
                "coreml",
                "fp16",
                FP16,
                False,
                "Core ML ML Program (iOS17), float16 compute; structural check only (no Core ML prediction is run)",
            ),
            PrecisionSpec(
                "coreml",
                "int8",
                INT8,
                False,
                "Core ML ML Program (iOS17), int8 linear weight quantization (palettize=6|4 for k-means palettes); structural check only (no Core ML prediction is run)",
            ),
        )
    }
)


@dataclass(frozen=True)
class ComponentExport:
    """How one component reaches one target.

    Args:
        component: "encoder", "text_encoder", "controlnet", "unet" or "decoder".
        target: the backend.
        file: file name inside the bundle (runtimes find it through the manifest).
        tracer: "torchscript" (torch.jit.trace / the TorchScript ONNX exporter) or "export" (torch.export).
        why: the reason for the tracer choice, measured with torch 2.13.
    """

    component: str
    target: str
    file: str
    tracer: str
    why: str


_ONNX_WHY = (
    "the TorchScript exporter's graphs go through onnxruntime's float16 converter and QDQ quantizer intact; "
    "dynamo=True graphs lost the U-Net under float16 conversion (-2.6 dB SNR) and broke quantize_static"
)
COMPONENT_EXPORTS: Mapping[tuple[str, str], ComponentExport] = MappingProxyType(
    {
        (e.component, e.target): e
        for e in (
            ComponentExport("encoder", "onnx", "encoder.onnx", "torchscript", _ONNX_WHY),
            ComponentExport("text_encoder", "onnx", "text_encoder.onnx", "torchscript", _ONNX_WHY),
            ComponentExport("controlnet", "onnx", "controlnet.onnx", "torchscript", _ONNX_WHY),
            ComponentExport("unet", "onnx", "unet.onnx", "torchscript", _ONNX_WHY),
            ComponentExport("decoder", "onnx", "decoder.onnx", "torchscript", _ONNX_WHY),
            ComponentExport(
                "encoder", "executorch", "encoder.pte", "export", "ExecuTorch lowers torch.export programs only"
            ),
            ComponentExport(
                "text_encoder",
                "executorch",
                "text_encoder.pte",
                "export",
                "ExecuTorch lowers torch.export programs only",
            ),
            ComponentExport(
                "controlnet", "executorch", "controlnet.pte", "export", "ExecuTorch lowers torch.export programs only"
            ),
            ComponentExport("unet", "executorch", "unet.pte", "export", "ExecuTorch lowers torch.export programs only"),
            ComponentExport(
                "decoder", "executorch", "decoder.pte", "export", "ExecuTorch lowers torch.export programs only"
            ),
            ComponentExport(
                "encoder", "coreml", "encoder.mlpackage", "export", "lowered with the decoder's tracer (torch.export)"
            ),
            ComponentExport(
                "text_encoder",
                "coreml",
                "text_encoder.mlpackage",
                "torchscript",
                "coremltools 9 has no converter for the 'alias' node torch.export leaves in CLIP",
            ),
            ComponentExport(
                "controlnet",
                "coreml",
                "controlnet.mlpackage",
                "export",
                "a copy of the U-Net's encoder with the same timestep broadcast, lowered with the U-Net's tracer",
            ),
            ComponentExport(
                "unet",
                "coreml",
                "unet.mlpackage",
                "export",
                "coremltools 9 fails on the traced 'int' of the timestep broadcast; the torch.export graph converts",
            ),
            ComponentExport(
                "decoder",
                "coreml",
                "decoder.mlpackage",
                "export",
                "the traced AutoencoderKL decoder hits the same 'int' conversion failure as the U-Net; torch.export converts both decoder classes",
            ),
        )
    }
)

assert {p for p, _ in PRECISION_SPECS} == set(TARGETS) and {q for _, q in PRECISION_SPECS} <= set(PRECISIONS)
assert set(COMPONENT_EXPORTS) == {(c, t) for c in COMPONENT_NAMES for t in TARGETS}

DELEGATES = ("xnnpack", "coreml")  # ExecuTorch backends a .pte can delegate to
PALETTE_BITS = (4, 6)
# ONNX static int8 activation calibrators (onnxruntime): see converters.to_onnx.CALIBRATION_OPTIONS.
ONNX_CALIBRATIONS = ("minmax", "minmax-average", "percentile", "mse")


def precision_spec(target: str, precision: str) -> PrecisionSpec:
    """The registry entry for a pair; the error lists the supported pairs."""
    try:
        return PRECISION_SPECS[(target, precision)]
    except KeyError:
        pairs = ", ".join(f"{t}/{p}" for t, p in PRECISION_SPECS)
        raise UnsupportedConversion(f"unsupported target/precision {target}/{precision}; supported: {pairs}") from None


def component_export(component: str, target: str) -> ComponentExport:
    try:
        return COMPONENT_EXPORTS[(component, target)]
    except KeyError:
        raise UnsupportedConversion(
            f"unknown component {component!r} for target {target!r}; components: {', '.join(COMPONENT_NAMES)}"
        ) from None
