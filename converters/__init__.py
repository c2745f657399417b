"""Converters: a model (preset, diffusers folder or loaded pipeline) -> a bundle for ONNX, ExecuTorch or
Core ML, checked against PyTorch before it is written.

    from converters import convert
    convert("tiny", "onnx", "int8", "out/tiny-onnx-int8")

Backends (`to_onnx`, `to_executorch`, `to_coreml`) and PyTorch are imported only when a conversion runs,
so `import converters` stays light.
"""

from __future__ import annotations

from converters.api import check_request, convert
from converters.registry import COMPONENT_EXPORTS, PRECISION_SPECS, UnsupportedConversion, precision_spec

__all__ = [
    "convert",
    "check_request",
    "PRECISION_SPECS",
    "COMPONENT_EXPORTS",
    "UnsupportedConversion",
    "precision_spec",
]
