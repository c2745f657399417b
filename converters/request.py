"""The conversion request: every option of `converters.convert`, checked once, before any model loads."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.registry import (
    DELEGATES,
    ONNX_CALIBRATIONS,
    PALETTE_BITS,
    PrecisionSpec,
    UnsupportedConversion,
    precision_spec,
)
from sdxs_edge.bundle import COMPONENT_NAMES, REQUIRED_COMPONENTS, TARGETS


def _finite(name: str, value) -> None:
    try:
        ok = not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UnsupportedConversion(f"{name} must be a finite number, got {value!r}")


def _component_list(components, controlnet, encoder: bool = False) -> list[str]:
    if components is None:
        extra = {"controlnet"} if controlnet is not None else set()
        return [
            c for c in COMPONENT_NAMES if c in REQUIRED_COMPONENTS or c in extra | ({"encoder"} if encoder else set())
        ]
    comps = [components] if isinstance(components, str) else list(components)
    if not comps:
        raise UnsupportedConversion(f"no components given; choose from {', '.join(COMPONENT_NAMES)}")
    unknown = [c for c in comps if c not in COMPONENT_NAMES]
    if unknown:
        raise UnsupportedConversion(f"unknown component {unknown[0]!r}; components: {', '.join(COMPONENT_NAMES)}")
    if len(set(comps)) != len(comps):
        raise UnsupportedConversion(f"component listed twice: {comps}")
    if "encoder" in comps and not encoder:
        raise UnsupportedConversion("the encoder component is listed but the encoder is left out (--no-encoder)")
    return comps


def default_encoder(model, trained: bool | None, controlnet) -> bool:
    """Whether a bundle gets the encoder component (image-to-image) unless told: yes for a trained model
    (a folder, a hub id, a pipeline not named after a preset, or trained=True) without a ControlNet; a
    preset's random-weight encoder is left out."""
    from sdxs_edge.presets import PRESETS

    if controlnet is not None:
        return False
    if trained is not None:
        return bool(trained)
    return str(getattr(model, "name", model)) not in PRESETS


def _check_options(
    target: str, precision: str, dynamic: bool, palettize, delegate: str, batch: int, resolution
) -> None:
    if dynamic and (target, precision) != ("onnx", "int8"):
        raise UnsupportedConversion(f"dynamic quantization is an ONNX int8 option, not {target}/{precision}")
    if palettize is not None and ((target, precision) != ("coreml", "int8") or palettize not in PALETTE_BITS):
        raise UnsupportedConversion(f"palettize={palettize} needs target coreml, precision int8 and 4 or 6 bits")
    if delegate not in DELEGATES:
        raise UnsupportedConversion(f"unknown ExecuTorch delegate {delegate!r}; delegates: {', '.join(DELEGATES)}")
    if delegate != "xnnpack" and target != "executorch":
        raise UnsupportedConversion(f"delegate={delegate} is an ExecuTorch option, not {target}")
    if (target, delegate, precision) == ("executorch", "coreml", "int8"):
        raise UnsupportedConversion(
            "executorch int8 is XNNPACK-only here; for int8 on Apple devices use target coreml precision int8"
        )
    if batch < 1:
        raise UnsupportedConversion(f"batch must be >= 1, got {batch}")
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise UnsupportedConversion(f"resolution must be a positive multiple of 8, got {resolution}")


def check_size_options(
    sizes, max_batch, batch: int, resolution, controlnet, target: str = "onnx"
) -> tuple[tuple[int, int], ...] | None:
    """`sizes` (None, "WxH,WxH" or (width, height) pairs) as checked pairs; the batch bound with it."""
    from sdxs_edge.sizes import SizeError, check_sizes, parse_sizes

    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UnsupportedConversion(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if max_batch > 1 and batch != 1:
        raise UnsupportedConversion(
            f"max_batch={max_batch} makes the batch dynamic (1 to {max_batch}); leave batch at 1"
        )
    if sizes is None:
        out = None
    else:
        try:
            out = check_sizes(parse_sizes(sizes) if isinstance(sizes, str) else sizes)
        except SizeError as e:
            raise UnsupportedConversion(str(e)) from None
        except (TypeError, ValueError):
            raise UnsupportedConversion(f"sizes must be 'WxH,WxH' or (width, height) pairs, got {sizes!r}") from None
        if resolution is not None:
            raise UnsupportedConversion("give either resolution or sizes (the first size is the default)")
    if target in ("coreml", "executorch") and max_batch > 1:
        why = {
            "coreml": "coremltools 9 cannot convert the U-Net with a symbolic batch",
            "executorch": "lowering a symbolic batch to XNNPACK did not finish in 15 minutes for the tiny model",
        }[target]
        raise UnsupportedConversion(f"{target} bundles take a static batch ({why}); drop max_batch")
    if controlnet is not None and (max_batch > 1 or (out is not None and len(out) > 1)):
        raise UnsupportedConversion("a ControlNet bundle takes one size and a static batch; drop sizes / max_batch")
    return out


def _check_adapters(comps: list[str], lora, lora_scale, controlnet, control_scale) -> None:
    _finite("lora_scale", lora_scale)
    if lora is None and lora_scale != 1.0:
        raise UnsupportedConversion(f"lora_scale={lora_scale} needs a LoRA file (lora=PATH, --lora PATH)")
    if lora is not None and "unet" not in comps:
        raise UnsupportedConversion("a LoRA is fused into the U-Net; add unet to the components")
    _finite("control_scale", control_scale)
    needs = "(controlnet=PATH, --controlnet PATH)"
    if controlnet is None and control_scale != 1.0:
        raise UnsupportedConversion(f"control_scale={control_scale} needs a ControlNet {needs}")
    if controlnet is None and "controlnet" in comps:
        raise UnsupportedConversion(f"the controlnet component needs a ControlNet {needs}")
    if controlnet is not None and "controlnet" in comps and "unet" not in comps:
        raise UnsupportedConversion("the ControlNet's residuals feed the U-Net; add unet to the components")
    if controlnet is not None and not {"controlnet", "unet"} & set(comps):
        raise UnsupportedConversion(
            "a ControlNet changes the controlnet and unet components only; add them to the components"
        )


def check_request(
    target: str,
    precision: str,
    components: Sequence[str] | None,
    dynamic: bool,
    palettize: int | None,
    delegate: str,
    batch: int,
    resolution: int | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    controlnet=None,
    control_scale: float = 1.0,
    encoder: bool = False,
) -> tuple[str, ...]:
    """Reject unsupported combinations before any model is loaded; returns components in bundle order.

    `components` None means every component the request has: text_encoder, unet, decoder, controlnet
    when a ControlNet is given (any non-None `controlnet`: a folder or a module), and encoder when
    `encoder` (image-to-image; not with a ControlNet).
    """
    if target not in TARGETS:
        raise UnsupportedConversion(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    precision_spec(target, precision)
    if encoder and controlnet is not None:
        raise UnsupportedConversion("an encoder (image-to-image) and a ControlNet in one bundle are not supported")
    comps = _component_list(components, controlnet, encoder)
    if "encoder" in comps and controlnet is not None:
        raise UnsupportedConversion("an encoder (image-to-image) and a ControlNet in one bundle are not supported")
    _check_options(target, precision, dynamic, palettize, delegate, batch, resolution)
    _check_adapters(comps, lora, lora_scale, controlnet, control_scale)
    return tuple(c for c in COMPONENT_NAMES if c in comps)


@dataclass(frozen=True)
class ConversionRequest:
    """One conversion, validated when built (the fields are `converters.convert`'s arguments).

    `components` is normalized to bundle order and `out` to a Path; nothing here loads a model or reads
    a file, so a bad request fails before any work. `sizes` (None: the one converted size) becomes a tuple
    of (width, height) pairs, multiples of 8 (the U-Net's own multiple is checked once it is loaded);
    `max_batch` > 1 makes the batch dynamic from 1 to it (`sdxs_edge.sizes`).
    """

    model: Any
    target: str
    precision: str
    out: Path
    components: Sequence[str] | None = None
    resolution: int | None = None
    calibration_prompts: Any = None
    overwrite: bool = False
    progress: bool = True
    dynamic: bool = False
    palettize: int | None = None
    delegate: str = "xnnpack"
    batch: int = 1
    sensitivity: bool = True
    sensitivity_shortlist: int | None = None
    max_float_fraction: float | None = None
    onnx_calibration: str = "minmax"
    trained: bool | None = None
    seed: int = 0
    lora: str | os.PathLike | None = None
    lora_scale: float = 1.0
    controlnet: Any = None
    control_scale: float = 1.0
    attention: str = "standard"
    cpu_classes: tuple[str, ...] = ("host",)
    layout: str = "sdxs-edge"
    encoder: bool | None = None
    sizes: Any = None
    max_batch: int = 1
    jobs: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 0:
            raise UnsupportedConversion(
                f"jobs must be 0 (as the machine allows) or a count >= 1 (1: one component at a time), got {self.jobs!r}"
            )
        enc = self.encoder
        if enc is None:  # optimum's layout has no image-to-image part: its default leaves the encoder out
            enc = self.layout == "sdxs-edge" and default_encoder(self.model, self.trained, self.controlnet)
        comps = check_request(
            self.target, self.precision, self.components, self.dynamic, self.palettize, self.delegate, self.batch,
            self.resolution, self.lora, self.lora_scale, self.controlnet, self.control_scale, enc,
        )  # fmt: skip
        sizes = check_size_options(
            self.sizes, self.max_batch, self.batch, self.resolution, self.controlnet, self.target
        )
        object.__setattr__(self, "sizes", sizes)
        if self.onnx_calibration not in ONNX_CALIBRATIONS:
            raise UnsupportedConversion(
                f"onnx_calibration must be one of {', '.join(ONNX_CALIBRATIONS)}; got {self.onnx_calibration!r}"
            )
        from sdxs_edge.attention import ATTENTION_VARIANTS

        if self.attention not in ATTENTION_VARIANTS:
            raise UnsupportedConversion(
                f"attention must be one of {', '.join(ATTENTION_VARIANTS)}; got {self.attention!r}"
            )
        from sdxs_edge import cpu

        classes = cpu.parse_classes(",".join(self.cpu_classes))
        for cls in classes:  # a class that cannot be emulated here fails now, before any lowering
            cpu.emulator(cls)
        from converters.layouts import check_layout

        check_layout(self.layout, self.target, comps, self.controlnet, self.precision, self.delegate)
        object.__setattr__(self, "cpu_classes", classes)
        object.__setattr__(self, "components", comps)
        object.__setattr__(self, "out", Path(self.out))

    @property
    def has_encoder(self) -> bool:
        """Whether the bundle holds the encoder (and so its U-Net takes the timestep as an input)."""
        return "encoder" in self.components

    @property
    def spec(self) -> PrecisionSpec:
        return precision_spec(self.target, self.precision)

    @property
    def dynamic_shapes(self) -> bool:
        """Whether the lowered programs take more than one size or batch."""
        return self.max_batch > 1 or len(self.sizes or ()) > 1

    @property
    def calibrate(self) -> bool:
        """Whether int8 calibration runs (static int8 on ONNX and ExecuTorch; Core ML quantizes weights only)."""
        return self.precision == "int8" and not self.dynamic and self.target != "coreml"

    @property
    def calibration_source(self) -> str:
        p = self.calibration_prompts
        if p is None:
            return "default SHAPES-64 captions"
        if isinstance(p, int) and not isinstance(p, bool):
            return f"{len(self.prompts())} SHAPES-64 captions"
        return str(p) if isinstance(p, (str, os.PathLike)) else "given list"

    def prompts(self) -> list[str]:
        """The calibration prompts (read from a file when one is named); [] when nothing calibrates."""
        from converters import calibration

        if self.calibrate or self.calibration_prompts is not None:
            return calibration.resolve_prompts(self.calibration_prompts)
        return []
