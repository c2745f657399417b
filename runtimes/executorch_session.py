"""ExecuTorch's Python runtime (`executorch.runtime`) over a bundle's .pte programs (XNNPACK-delegated).

The Python bindings take and return torch tensors, so this runtime needs PyTorch (the executorch
wheel depends on it anyway); the on-device path is the native runner (`runtimes/native/`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes.base import BackendMissingError, Session
from sdxs_edge import sizes
from sdxs_edge.bundle import BundleError
from sdxs_edge.quiet import filtered_stderr


class ExecuTorchSession(Session):
    """A bundle's three .pte programs on the ExecuTorch Python runtime.

    Args:
        bundle: an "executorch" target bundle.
        method: the program method to run ("forward", as `to_executorch` names it); a bundle of several
            sizes also runs "<method>_<W>x<H>" at each size but the first (`sdxs_edge.sizes.method_name`).
        verify: check every component file's sha256 against the manifest.
    """

    name = "executorch"
    targets = ("executorch",)

    def __init__(self, bundle: str | Path, *, method: str = "forward", verify: bool = True):
        super().__init__(bundle, verify=verify)
        with filtered_stderr():  # library noise at import and method load (sdxs_edge.quiet)
            self._load(method)

    def _load(self, method: str) -> None:
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError as e:
            raise BackendMissingError(
                f"the executorch runtime needs the executorch package (pip install 'sdxs-edge[executorch]'): {e}"
            ) from None
        self._torch = torch
        rt = Runtime.get()
        self.backends = list(rt.backend_registry.registered_backend_names)
        self.methods = {}
        for comp, spec in self.specs.items():
            path, program = self.bundle / spec.file, None
            for size in self.sizes:
                program, m = self._load_method(rt, path, program, sizes.method_name(self.sizes, size, method))
                self.methods[comp, size] = m

    def _load_method(self, rt, path: Path, program, method: str):
        """(program, one of its methods): one method per image size of a bundle of several."""
        try:
            program = program or rt.load_program(path)
            m = program.load_method(method)
        except Exception as e:  # the bindings raise RuntimeError with an ExecuTorch error code
            raise BundleError(
                f"{path}: ExecuTorch cannot load method {method!r} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                f"backends in this runtime: {', '.join(self.backends)}"
            ) from e
        if m is None:
            raise BundleError(
                f"{path}: the program has no method {method!r} (it has: {', '.join(sorted(program.method_names))})"
            )
        return program, m

    def _run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        spec = self.specs[component]
        outs = self.methods[component, self.shape_of(component, inputs)[1]].execute(
            [torch.from_numpy(inputs[s.name]) for s in spec.inputs]
        )
        return {s.name: o.numpy().copy() for s, o in zip(spec.outputs, outs)}

    def close(self) -> None:
        self.methods = {}
