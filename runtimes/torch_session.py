"""The PyTorch reference runtime: the bundle's source model through `sdxs_edge.components` wrappers.

It runs whatever the bundle was converted from (manifest["source"]["model"]: a preset name, a model
folder or a hub id), or an explicit `reference=` model, in float32 on CUDA when present, else CPU, and
takes the same checked inputs as every other runtime, so parity compares like with like.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes.base import BackendMissingError, Session


def resolve_source(bundle: Path, source: str) -> str:
    """A manifest's source model as `SDXSPipeline.load` takes it: a relative folder is tried against the
    working directory, then the bundle's parent; presets and hub ids pass through."""
    p = Path(source).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    beside = bundle.parent / p
    return str(beside) if beside.exists() else source


class TorchSession(Session):
    """Runs the bundle's source model (or `reference`) in PyTorch.

    Args:
        bundle: the bundle directory (any target: the reference does not read the lowered files).
        reference: model to run instead of manifest["source"]["model"]: a preset name, a model folder,
            a hub id, or a loaded `SDXSPipeline`.
        device: "cpu" or "cuda"; default CUDA when available.
        verify: check every component file's sha256 against the manifest.
    """

    name = "torch"
    targets = ()

    def __init__(self, bundle: str | Path, *, reference=None, device: str | None = None, verify: bool = True):
        super().__init__(bundle, verify=verify)
        try:
            import torch
        except ImportError:
            raise BackendMissingError("the torch reference runtime needs PyTorch (pip install torch==2.13.0)") from None
        from sdxs_edge.components import wrappers
        from sdxs_edge.pipeline import SDXSPipeline

        self._torch = torch
        if isinstance(reference, SDXSPipeline):
            pipe = reference
        else:
            src = str(reference) if reference is not None else resolve_source(self.bundle, self.manifest["source"]["model"])
            pipe = SDXSPipeline.load(src)
        self.pipeline = pipe
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.modules = {k: m.to(self.device) for k, m in wrappers(pipe).items()}

    def _run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        spec = self.specs[component]
        args = []
        for s in spec.inputs:
            t = torch.from_numpy(inputs[s.name]).to(self.device)
            args.append(t.float() if t.is_floating_point() else t)
        with torch.no_grad():
            out = self.modules[component](*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {s.name: o.detach().float().cpu().numpy() for s, o in zip(spec.outputs, outs)}
