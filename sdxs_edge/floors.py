"""The parity floors: one table of what a bundle of each precision must reach against PyTorch.

Both checks read it: the converters' check before a bundle is written (`converters.registry`, per
component and, where `image_at_conversion`, end to end) and `sdxs-edge parity` on any runtime
(`runtimes.parity`, per component, end to end, and the SHAPES-64 all-correct rate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Floors:
    """What a bundle of one precision must reach against PyTorch on the same inputs.

    Args:
        component_snr_db: minimum SNR of every component's output (dB).
        image_psnr_db: minimum end-to-end image PSNR (uint8, dB); enforced for trained models only, since
            random weights make images of amplified noise whose PSNR says nothing about deployment.
        image_at_conversion: whether the converter also enforces `image_psnr_db` before writing the
            bundle. int8 only: fp32 and fp16 are judged on their component floors at conversion, and
            `sdxs-edge parity` applies the image floor to every precision.
        all_correct_points: largest allowed drop of the SHAPES-64 all-correct rate, in percentage points
            (`sdxs-edge parity` only).
        all_correct_min_prompts: the drop is enforced from this many prompts on; below it one image moves
            the rate by more than the allowed drop, so the rates are shown but not judged.
    """

    component_snr_db: float
    image_psnr_db: float = 28.0
    image_at_conversion: bool = False
    all_correct_points: float = 3.0
    all_correct_min_prompts: int = 64


# fp32 differs only by kernel order (a faithful re-expression of the graph); fp16 by half-precision
# rounding (10 mantissa bits: ~60 dB per op, ~40 dB through a deep network); int8 keeps ~8 bits of range
# per tensor.
FLOORS: Mapping[str, Floors] = MappingProxyType(
    {
        "fp32": Floors(component_snr_db=60.0),
        "fp16": Floors(component_snr_db=40.0),
        "int8": Floors(component_snr_db=25.0, image_at_conversion=True),
    }
)
