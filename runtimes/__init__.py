"""Runtimes: run a bundle (converters' output) on one backend behind one small contract.

    import runtimes
    with runtimes.load("bundles/tiny-onnx-fp32", runtime="onnxruntime") as s:
        image = s.generate("a small red circle at the top on a white background", seed=0)

Every runtime is a `runtimes.base.Session` subclass, named in `RUNTIMES` by a lazy import path, so
importing this package imports no backend library (the optional extras of pyproject.toml).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from runtimes.base import BackendMissingError, RuntimeInputError, Session, UnsupportedTargetError
from sdxs_edge.errors import SDXSError

# name -> "module:Class". Order is the order `sdxs-edge` lists them.
RUNTIMES: dict[str, str] = {
    "torch": "runtimes.torch_session:TorchSession",
    "onnxruntime": "runtimes.onnxruntime_session:OnnxRuntimeSession",
    "executorch": "runtimes.executorch_session:ExecuTorchSession",
    "executorch-native": "runtimes.native_session:NativeSession",
    "executorch-capi": "runtimes.capi_session:CapiSession",
    "coreml": "runtimes.coreml_session:CoreMLSession",
    "android": "runtimes.android:AndroidSession",
    "arm64-emulated": "runtimes.arm64_emulated:Arm64EmulatedSession",
}

# The runtime that runs each bundle target natively on this machine (for `--runtime auto`).
DEFAULT_FOR_TARGET = {"onnx": "onnxruntime", "executorch": "executorch", "coreml": "coreml"}


class UnknownRuntimeError(SDXSError):
    """A runtime name that is not in `RUNTIMES`."""


def session_class(runtime: str) -> type[Session]:
    """The Session subclass registered under `runtime` (imports its module now).

    Args:
        runtime: a key of `RUNTIMES`.
    """
    if runtime not in RUNTIMES:
        raise UnknownRuntimeError(f"unknown runtime {runtime!r}; valid runtimes: {', '.join(RUNTIMES)}")
    module, cls = RUNTIMES[runtime].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise BackendMissingError(
                f"runtime {runtime!r} is registered but its module {module} is not installed in this checkout"
            ) from e
        raise
    return getattr(mod, cls)


def load(bundle: str | Path, runtime: str, **options) -> Session:
    """Open a bundle on a runtime.

    Args:
        bundle: the bundle directory.
        runtime: a key of `RUNTIMES` ("torch", "onnxruntime", "executorch", "executorch-native",
            "executorch-capi", "coreml", "android", "arm64-emulated").
        **options: the runtime's own keyword options (e.g. `providers=` for onnxruntime,
            `compute_units=` for coreml, `reference=` for torch, `verify=` for all); an option the
            runtime does not take is an error naming the ones it does.
    """
    cls = session_class(runtime)
    params = inspect.signature(cls.__init__).parameters
    accepted = [n for n, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown and not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise SDXSError(
            f"runtime {runtime!r} does not take option(s) {', '.join(unknown)} (it takes: {', '.join(accepted) or 'none'})"
        )
    return cls(bundle, **options)


__all__ = [
    "RUNTIMES",
    "BackendMissingError",
    "RuntimeInputError",
    "Session",
    "UnknownRuntimeError",
    "UnsupportedTargetError",
    "load",
    "session_class",
]
