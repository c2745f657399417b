"""ONNX Runtime over a bundle's .onnx files: CPU by default, Core ML / NNAPI / other execution providers
on request. Imports no PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes.base import BackendMissingError, Session
from sdxs_edge.bundle import BundleError

# Short names accepted by `providers=` and `--providers`.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}
_SHARED_ARENA = False  # registered once per process (onnxruntime's environment is process-wide)


def _shared_cpu_arena(ort) -> None:
    """Register one CPU arena in onnxruntime's environment for every session of this process.

    A bundle runs three sessions one after another; with an arena each, the text encoder's, U-Net's and
    decoder's peaks add up, while a shared one only holds the largest. Measured on the sdxs-512 int8
    bundle at 512x512 (split-heads attention, weights in .data files, 552 MB, 2 threads): peak resident
    memory over load and three images 1,177 MB with an arena and a memory pattern per session, 1,008 MB
    without the patterns, 722 MB shared and without the patterns; latency unchanged (U-Net 306 / 320 /
    310 ms).
    """
    global _SHARED_ARENA
    if _SHARED_ARENA:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # defaults: no cap, power-of-two growth
    _SHARED_ARENA = True


class OnnxRuntimeSession(Session):
    """A bundle's three ONNX programs on onnxruntime.

    Args:
        bundle: an "onnx" target bundle.
        providers: execution providers in priority order, full names ("CoreMLExecutionProvider") or
            short ones (cpu, coreml, nnapi, xnnpack, cuda). Asking for one this onnxruntime build lacks
            is an error, never a silent fall back to CPU.
        threads: intra-op threads (None: onnxruntime's default, one per core).
        verify: check every component file's sha256 against the manifest.
    """

    name = "onnxruntime"
    targets = ("onnx",)

    def __init__(
        self,
        bundle: str | Path,
        *,
        providers: tuple[str, ...] | list[str] | str = ("cpu",),
        threads: int | None = None,
        verify: bool = True,
    ):
        super().__init__(bundle, verify=verify)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendMissingError(
                "the onnxruntime runtime needs onnxruntime (pip install 'sdxs-edge[onnxruntime]')"
            ) from None
        names = [providers] if isinstance(providers, str) else list(providers)
        if not names:
            raise BackendMissingError("providers= is empty; name at least one execution provider (e.g. cpu)")
        wanted = [PROVIDER_ALIASES.get(p.lower(), p) for p in names]
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BackendMissingError(
                f"onnxruntime execution provider(s) {', '.join(missing)} not available in this onnxruntime build (available: {', '.join(available)})"
            )
        self.providers = wanted
        _shared_cpu_arena(ort)
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3
        # Memory: one process-wide CPU arena for the three sessions, and no per-session memory pattern
        # (a pre-planned block per session, kept for its lifetime); see _shared_cpu_arena.
        opts.add_session_config_entry("session.use_env_allocators", "1")
        opts.enable_mem_pattern = False
        self.sessions = {}
        for comp, spec in self.specs.items():
            path = self.bundle / spec.file
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
            except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
                raise BundleError(
                    f"{path}: onnxruntime cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
                ) from e
            self._check_program(comp, sess)
            self.sessions[comp] = sess

    def _check_program(self, comp: str, sess) -> None:
        """The .onnx file must take and return exactly what the manifest declares."""
        spec = self.specs[comp]
        got = [(i.name, _ORT_TYPES.get(i.type, i.type), tuple(i.shape)) for i in sess.get_inputs()]
        want = [(s.name, s.dtype, s.shape) for s in spec.inputs]
        # Dynamic dimensions (strings) are allowed; static ones must equal the manifest's.
        same = len(got) == len(want) and all(
            gn == wn
            and gt == wt
            and len(gs) == len(ws)
            and all(not isinstance(g, int) or g == w for g, w in zip(gs, ws))
            for (gn, gt, gs), (wn, wt, ws) in zip(got, want)
        )
        if not same:
            raise BundleError(f"{self.bundle / spec.file}: program inputs {got} do not match the manifest's {want}")
        out_names = [o.name for o in sess.get_outputs()]
        if out_names[: len(spec.outputs)] != [s.name for s in spec.outputs]:
            raise BundleError(
                f"{self.bundle / spec.file}: program outputs {out_names} do not match the manifest's {[s.name for s in spec.outputs]}"
            )

    def _run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        names = [s.name for s in spec.outputs]
        return dict(zip(names, self.sessions[component].run(names, inputs)))

    def close(self) -> None:
        self.sessions = {}
