"""ONNX Runtime over a bundle's .onnx files: CPU by default, Core ML / NNAPI / other execution providers
on request. Imports no PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes.base import BackendMissingError, Session
from sdxs_edge import sizes
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
        self._ort, self._threads = ort, threads
        self.sessions = {}
        self._sized: dict[tuple, object] = {}  # (component, batch, size) -> a session fixed to that shape
        self._fixes = len(self.sizes) > 1 or self.max_batch > 1
        for comp in self.specs:
            sess = self._open(comp, self.batch, self.sizes[0])
            self._check_program(comp, sess)
            self.sessions[comp] = self._sized[comp, self.batch, self.sizes[0]] = sess

    def _open(self, comp: str, batch: int, size: tuple[int, int]):
        """An onnxruntime session on a component's file. For a bundle of several sizes or batches, its
        dynamic dimensions fixed to `batch` and `size` (`add_free_dimension_override_by_name`): the graph is
        then planned as a static one. Measured on the shipped model's fp32 U-Net at 64x64 (1 thread, AVX2):
        fastest of 60 runs 3.1-3.4 ms with the fixed-size file, 8.0-12.7 ms with dynamic axes left free,
        3.5-3.6 ms with them fixed."""
        ort, spec = self._ort, self.specs[comp]
        opts = ort.SessionOptions()
        if self._threads is not None:
            opts.intra_op_num_threads = int(self._threads)
        opts.log_severity_level = 3
        # Memory: one process-wide CPU arena for the three sessions, and no per-session memory pattern
        # (a pre-planned block per session, kept for its lifetime); see _shared_cpu_arena.
        opts.add_session_config_entry("session.use_env_allocators", "1")
        opts.enable_mem_pattern = False
        if self._fixes:
            for t in (*spec.inputs, *spec.outputs):  # the names `converters.to_onnx.dynamic_axes` gives
                shape = sizes.shape_at(t.shape, self.sizes[0], size, batch)
                if len(shape) == 4:
                    opts.add_free_dimension_override_by_name(f"{t.name}_height", shape[2])
                    opts.add_free_dimension_override_by_name(f"{t.name}_width", shape[3])
            opts.add_free_dimension_override_by_name("batch", batch)
        path = self.bundle / spec.file
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BundleError(
                f"{path}: onnxruntime cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
            ) from e

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
        batch, size = self.shape_of(component, inputs)
        key = (component, batch, size)
        if key not in self._sized:  # another size or batch: its own session, opened on first use
            self._sized[key] = self._open(component, batch, size)
        return dict(zip(names, self._sized[key].run(names, inputs)))

    def close(self) -> None:
        self.sessions, self._sized = {}, {}
