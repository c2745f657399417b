"""Core ML over a bundle's .mlpackage programs (coremltools `MLModel.predict`), macOS only.

Core ML prediction needs Apple's Core ML framework: coremltools installs and converts on Linux, but
cannot run a model there, so on any other system this runtime stops with one line saying so.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np

from runtimes.base import BackendMissingError, Session
from sdxs_edge.bundle import BundleError
from sdxs_edge.errors import SDXSError

COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


class CoreMLSession(Session):
    """A bundle's three .mlpackage programs on Core ML.

    Args:
        bundle: a "coreml" target bundle.
        compute_units: CPU_ONLY, CPU_AND_GPU, CPU_AND_NE (Neural Engine) or ALL.
        verify: check every component file's sha256 against the manifest.
    """

    name = "coreml"
    cpu_class = None
    targets = ("coreml",)

    def __init__(self, bundle: str | Path, *, compute_units: str = "ALL", verify: bool = True):
        units = compute_units.upper()
        if units not in COMPUTE_UNITS:
            raise SDXSError(f"unknown Core ML compute units {compute_units!r} (valid: {', '.join(COMPUTE_UNITS)})")
        super().__init__(bundle, verify=verify)
        if sys.platform != "darwin":
            raise BackendMissingError(
                f"the coreml runtime needs macOS (Apple's Core ML framework); this is {platform.system()} {platform.machine()} - "
                "run this bundle on a Mac, or convert to onnx/executorch to run here"
            )
        try:
            import coremltools as ct
        except ImportError:
            raise BackendMissingError(
                "the coreml runtime needs coremltools (pip install 'sdxs-edge[coreml]')"
            ) from None
        self.compute_units = units
        self.models = {}
        for comp, spec in self.specs.items():
            path = self.bundle / spec.file
            try:
                self.models[comp] = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, units))
            except Exception as e:  # coremltools raises many kinds; name the file and keep the cause
                raise BundleError(
                    f"{path}: Core ML cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
                ) from e

    def _run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        out = self.models[component].predict(inputs)
        return {s.name: np.asarray(out[s.name]) for s in spec.outputs}

    def close(self) -> None:
        self.models = {}
