"""ExecuTorch bundles through libsdxs, the C API an app links (runtimes/native/sdxs.h), loaded with ctypes.

Everything of a generation runs in the library: the manifest and sha256 checks, the CLIP tokenizer,
the default noise (torch.randn's CPU stream for the seed), the three programs, the one-step rule and the
uint8 conversion; Python only hands over buffers. `generate_arrays` is one `sdxs_generate_arrays` call
(with the caller's noise when given, as `runtimes.parity` gives it), and each component can be run alone
(`sdxs_run_component`), so `parity` and the benchmark measure this path like the others. Build the
library with `make host-runner` (runtimes/native/build_host.sh: build/host/libsdxs.so).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtimes.base import BackendMissingError, GenerationResult, RuntimeInputError, Session
from sdxs_edge.bundle import BundleError
from sdxs_edge.errors import NonFiniteError, SDXSError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LIBRARY = REPO / "build" / "host" / "libsdxs.so"
BUILD_HINT = "run `make host-runner` (runtimes/native/build_host.sh)"
# sdxs.h's status codes
OK, E_ARGUMENT, E_BUNDLE, E_UNSUPPORTED, E_PROMPT, E_SIZE, E_RUNTIME = range(7)


class CapiError(SDXSError):
    """libsdxs returned an error code (`code`); the message is the library's."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Arrays(ctypes.Structure):
    _fields_ = [
        ("token_ids", ctypes.c_void_p),
        ("noise", ctypes.c_void_p),
        ("context", ctypes.c_void_p),
        ("model_output", ctypes.c_void_p),
        ("latent", ctypes.c_void_p),
        ("image", ctypes.c_void_p),
        ("rgb", ctypes.c_void_p),
        ("ms", ctypes.c_double * 5),
    ]


def load_library(path: str | Path | None = None) -> ctypes.CDLL:
    """libsdxs with its functions' signatures declared.

    Args:
        path: the shared library (default build/host/libsdxs.so).
    """
    path = Path(path) if path is not None else DEFAULT_LIBRARY
    if not path.is_file():
        raise BackendMissingError(f"libsdxs {path} is not built; {BUILD_HINT}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise BackendMissingError(f"cannot load {path}: {e}; {BUILD_HINT}") from None
    p, i, u64, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64
    sigs = {
        "sdxs_open_flags": (p, [ctypes.c_char_p, ctypes.c_uint]),
        "sdxs_close": (None, [p]),
        "sdxs_last_error": (ctypes.c_char_p, []),
        "sdxs_last_error_code": (i, []),
        "sdxs_generate": (i, [p, ctypes.c_char_p, u64, i, i, p]),
        "sdxs_generate_arrays": (i, [p, ctypes.c_char_p, u64, i, ctypes.POINTER(_Arrays)]),
        "sdxs_run_component": (i, [p, ctypes.c_char_p, ctypes.POINTER(p), ctypes.POINTER(p)]),
        "sdxs_tokenize": (i, [p, ctypes.c_char_p, p, ctypes.POINTER(i)]),
        "sdxs_noise": (i, [u64, i64, p]),
        "sdxs_threads": (i, [i, ctypes.POINTER(i)]),
        "sdxs_tokenizer_open": (p, [ctypes.c_char_p, i]),
        "sdxs_tokenizer_ids": (i, [p, ctypes.c_char_p, p, ctypes.POINTER(i)]),
        "sdxs_tokenizer_close": (None, [p]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def check(lib: ctypes.CDLL, rc: int) -> None:
    """Raise CapiError with the library's message unless `rc` is SDXS_OK."""
    if rc != OK:
        raise CapiError(rc, lib.sdxs_last_error().decode("utf-8", "replace"))


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _prompt_bytes(prompt: str | bytes) -> bytes:
    if isinstance(prompt, bytes):
        return prompt
    try:
        return prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates
        raise RuntimeInputError(f"the prompt is not valid Unicode text: {e}") from None


class CapiSession(Session):
    """A bundle opened by libsdxs (sdxs.h) in this process.

    Args:
        bundle: an "executorch" target bundle with XNNPACK programs, batch 1, float32 I/O.
        library: the shared library (default build/host/libsdxs.so).
        threads: ExecuTorch threadpool size for the process (XNNPACK runs on it); default one per core.
        verify: check every program's sha256 (libsdxs does it) against the manifest.
    """

    name = "executorch-capi"
    targets = ("executorch",)

    def __init__(
        self, bundle: str | Path, *, library: str | Path | None = None, threads: int | None = None, verify: bool = True
    ):
        self._ctx = None
        super().__init__(bundle, verify=False)  # the manifest for shapes; libsdxs checks the hashes itself
        self._lib = load_library(library)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        n = ctypes.c_int(0)
        check(self._lib, self._lib.sdxs_threads(threads or 0, ctypes.byref(n)))
        self.threads: int = n.value
        ctx = self._lib.sdxs_open_flags(str(self.bundle).encode(), 0 if verify else 1)
        if not ctx:
            code, msg = self._lib.sdxs_last_error_code(), self._lib.sdxs_last_error().decode("utf-8", "replace")
            raise BundleError(msg) if code == E_BUNDLE else CapiError(code, msg)
        self._ctx = ctx
        self.library_timings: dict[str, float] = {}

    def _check(self, rc: int) -> None:
        if rc == E_RUNTIME and "non-finite" in self._lib.sdxs_last_error().decode("utf-8", "replace"):
            raise NonFiniteError(self._lib.sdxs_last_error().decode("utf-8", "replace"))
        check(self._lib, rc)

    def _need_open(self) -> None:
        if self._ctx is None:
            raise SDXSError(f"{self.name} session on {self.bundle} is closed")

    def _run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._need_open()
        spec = self.specs[component]
        ins = [np.ascontiguousarray(inputs[s.name]) for s in spec.inputs]
        outs = [np.empty(s.shape, np.dtype(s.dtype)) for s in spec.outputs]
        in_ptrs = (ctypes.c_void_p * len(ins))(*[a.ctypes.data for a in ins])
        out_ptrs = (ctypes.c_void_p * len(outs))(*[a.ctypes.data for a in outs])
        self._check(self._lib.sdxs_run_component(self._ctx, component.encode(), in_ptrs, out_ptrs))
        return {s.name: a for s, a in zip(spec.outputs, outs)}

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids from libsdxs's tokenizer, in the text encoder's declared dtype."""
        self._need_open()
        out = np.empty((len(prompts), self.max_length), np.int64)
        n = ctypes.c_int(0)
        for row, text in enumerate(prompts):
            self._check(self._lib.sdxs_tokenize(self._ctx, _prompt_bytes(text), out[row].ctypes.data, ctypes.byref(n)))
        return out.astype(self.specs["text_encoder"].inputs[0].dtype)

    def noise(self, seed: int, rng: str = "torch", batch=None, width=None, height=None) -> np.ndarray:
        """libsdxs's noise for rng "torch": torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed));
        "numpy" is the base class's numpy stream. libsdxs runs the bundle's default size and batch only."""
        self._default_size_only(width, height, batch)
        if rng != "torch":
            return super().noise(seed, rng)
        out = np.empty(self.latent_shape, np.float32)
        check(self._lib, self._lib.sdxs_noise(int(seed) & (2**64 - 1), out.size, out.ctypes.data))
        return out

    def generate_arrays(
        self,
        prompt: str | Sequence[str],
        seed: int = 0,
        noise: np.ndarray | None = None,
        control_image=None,
        rng: str = "torch",
        image=None,
        strength: float | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> GenerationResult:
        """One `sdxs_generate_arrays` call: tokenizer, noise (unless given), components and rule in libsdxs.
        libsdxs draws the "torch" stream itself; another `rng` is drawn here and handed in. Image-to-image
        (`image=`, a bundle with an encoder) runs the components one by one through `sdxs_run_component`,
        with the base class's steps. libsdxs runs the bundle's default (first) size only."""
        self._need_open()
        self._default_size_only(width, height, None)
        if image is not None or strength is not None:
            return super().generate_arrays(prompt, seed, noise, control_image, rng, image, strength)
        if noise is None and rng != "torch":
            noise = self.noise(seed, rng)
        if control_image is not None:
            raise RuntimeInputError(
                f"{self.bundle} has no ControlNet, so it takes no control image (libsdxs runs bundles without one)"
            )
        (text,) = [prompt] if isinstance(prompt, bytes) else self._prompts(prompt)  # bytes go to libsdxs as they are
        te, un, de = self.specs["text_encoder"], self.specs["unet"], self.specs["decoder"]
        given = noise is not None
        if given:
            noise = np.asarray(noise)
            if tuple(noise.shape) != self.latent_shape or noise.dtype.kind != "f":
                raise RuntimeInputError(
                    f"noise: expected float {list(self.latent_shape)}, got {noise.dtype}{list(noise.shape)}"
                )
            noise = np.ascontiguousarray(noise, np.float32)
        else:
            noise = np.empty(self.latent_shape, np.float32)
        ids = np.empty(te.inputs[0].shape, np.int64)
        context = np.empty(te.outputs[0].shape, np.float32)
        eps = np.empty(un.outputs[0].shape, np.float32)
        latent = np.empty(de.inputs[0].shape, np.float32)
        image = np.empty(de.outputs[0].shape, np.float32)
        arrays = _Arrays(_ptr(ids), _ptr(noise), _ptr(context), _ptr(eps), _ptr(latent), _ptr(image), None)
        t = time.perf_counter()
        self._check(
            self._lib.sdxs_generate_arrays(
                self._ctx, _prompt_bytes(text), int(seed) & (2**64 - 1), int(given), ctypes.byref(arrays)
            )
        )
        total = time.perf_counter() - t
        ms = list(arrays.ms)
        timings = {"tokenize": ms[0] / 1e3, "text_encoder": ms[1] / 1e3, "unet": ms[2] / 1e3, "decoder": ms[3] / 1e3}
        self.timings.update({k: v for k, v in timings.items() if k != "tokenize"})
        self.library_timings = {"total": ms[4] / 1e3, "call": total}
        return GenerationResult(image, latent, context, eps, noise, ids.astype(te.inputs[0].dtype), timings)

    def _default_size_only(self, width, height, batch) -> None:
        H, W = self.image_size
        size = (W if width is None else width, H if height is None else height)
        if size != (W, H) or (batch is not None and batch != self.batch):
            raise RuntimeInputError(
                f"libsdxs runs a bundle at its default size {W}x{H} and batch {self.batch} only; got {size[0]}x{size[1]}"
                f" batch {self.batch if batch is None else batch} (use the executorch-native runtime for the bundle's other sizes)"
            )

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            self._lib.sdxs_close(ctx)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
