"""The raw tensor files `runtimes/native/runner.cpp` (sdxs_runner) reads and writes: "SDXT" version 1.

Every field little-endian:

    offset       size      field
    0            4         magic b"SDXT"
    4            4         uint32 dtype code (ExecuTorch/c10 ScalarType numbering, `DTYPE_CODES`)
    8            4         uint32 ndim (0..16)
    12           8*ndim    int64 dims
    12+8*ndim              data: prod(dims) elements, C-contiguous, nothing after it

Also the helpers the native runtimes (arm64-emulated, android, executorch-native) share around a runner call: the
`--io` folder layout (in<i>.bin / out<i>.bin), the `SDXS_TIMING` line, and one-line failure messages.
Numpy and the standard library only, so the emulated and Android runtimes need no PyTorch.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from sdxs_edge.errors import SDXSError

MAGIC = b"SDXT"
MAX_DIMS = 16
# numpy dtype name -> ScalarType code (c10/core/ScalarType.h order), the codes the runner accepts.
DTYPE_CODES: dict[str, int] = {
    "uint8": 0,
    "int8": 1,
    "int16": 2,
    "int32": 3,
    "int64": 4,
    "float16": 5,
    "float32": 6,
    "float64": 7,
    "bool": 11,
}
_CODE_DTYPES = {code: name for name, code in DTYPE_CODES.items()}


class TensorFileError(SDXSError):
    """A raw tensor file is malformed, or an array has a dtype the format does not carry."""


def write_tensor(path: str | Path, array: np.ndarray) -> Path:
    """Write `array` as an SDXT file (C-contiguous, little-endian).

    Args:
        path: file to write (replaced if it exists).
        array: a numpy array of one of the `DTYPE_CODES` dtypes.
    """
    a = np.asarray(array)
    code = DTYPE_CODES.get(a.dtype.name)
    if code is None:
        raise TensorFileError(f"{path}: dtype {a.dtype} has no SDXT code (supported: {', '.join(DTYPE_CODES)})")
    if a.ndim > MAX_DIMS:
        raise TensorFileError(f"{path}: {a.ndim} dimensions exceed the format's {MAX_DIMS}")
    # astype, not ascontiguousarray: that one turns a 0-d array into 1-d.
    a = a.astype(a.dtype.newbyteorder("<"), order="C", copy=False)
    path = Path(path)
    with path.open("wb") as f:
        f.write(MAGIC + struct.pack(f"<II{a.ndim}q", code, a.ndim, *a.shape))
        f.write(a.tobytes(order="C"))
    return path


def read_tensor(path: str | Path) -> np.ndarray:
    """Read an SDXT file into a numpy array (native byte order); raise TensorFileError when malformed.

    The header is parsed and the size checked first; the data then goes straight from the file into
    the array (one copy: a 512x512 image is 3 MB, read once per generation).

    Args:
        path: the file.
    """
    path = Path(path)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise TensorFileError(f"{path}: no such tensor file") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(12)
        if len(head) < 12 or head[:4] != MAGIC:
            raise TensorFileError(f"{path}: not an SDXT tensor file ({size} bytes, magic {head[:4]!r})")
        code, ndim = struct.unpack_from("<II", head, 4)
        if code not in _CODE_DTYPES:
            raise TensorFileError(f"{path}: unsupported dtype code {code}")
        if ndim > MAX_DIMS or size < 12 + 8 * ndim:
            raise TensorFileError(f"{path}: bad header (ndim {ndim}, {size} bytes)")
        dims = struct.unpack(f"<{ndim}q", f.read(8 * ndim))
        if any(d < 0 for d in dims):
            raise TensorFileError(f"{path}: negative dimension in shape {list(dims)}")
        dtype = np.dtype(_CODE_DTYPES[code]).newbyteorder("<")
        count = int(np.prod(dims, dtype=np.int64))
        expected = 12 + 8 * ndim + count * dtype.itemsize
        if size != expected:
            raise TensorFileError(f"{path}: {size} bytes, expected {expected} for {dtype.name}{list(dims)}")
        data = np.empty(count, dtype=dtype)
        if count and f.readinto(memoryview(data).cast("B")) != data.nbytes:
            raise TensorFileError(f"{path}: shorter than its header says (changed while reading?)")
    return data.reshape(dims).astype(dtype.newbyteorder("="), copy=False)


class RunnerError(SDXSError):
    """The native runner (sdxs_runner) failed to load or run a program, or left no outputs."""


TIMING_PREFIX = "SDXS_TIMING "


def write_inputs(io_dir: str | Path, arrays: list[np.ndarray]) -> list[Path]:
    """Write `arrays` as `io_dir/in0.bin`, `in1.bin`, ... in positional order (the runner's `--io` layout).

    Args:
        io_dir: an existing folder.
        arrays: the method's inputs in the order the program takes them.
    """
    return [write_tensor(Path(io_dir) / f"in{i}.bin", a) for i, a in enumerate(arrays)]


def read_outputs(io_dir: str | Path, count: int, what: str) -> list[np.ndarray]:
    """Read `io_dir/out0.bin` .. `out<count-1>.bin`; a missing or extra output is a RunnerError.

    Args:
        io_dir: the folder the runner wrote to.
        count: number of outputs the manifest declares.
        what: name for messages (e.g. "unet on arm64-emulated").
    """
    io_dir = Path(io_dir)
    missing = [i for i in range(count) if not (io_dir / f"out{i}.bin").is_file()]
    if missing:
        raise RunnerError(f"{what}: the runner wrote no out{missing[0]}.bin (the manifest declares {count} output(s))")
    if (io_dir / f"out{count}.bin").exists():
        raise RunnerError(f"{what}: the program has more outputs than the manifest's {count}")
    return [read_tensor(io_dir / f"out{i}.bin") for i in range(count)]


def parse_timing(stdout: str) -> dict:
    """The runner's `SDXS_TIMING {...}` line as a dict (load_ms, run_ms, ...); RunnerError when absent."""
    for line in stdout.splitlines():
        if line.startswith(TIMING_PREFIX):
            try:
                return json.loads(line[len(TIMING_PREFIX) :])
            except json.JSONDecodeError:
                break
    raise RunnerError(
        f"the runner exited 0 but printed no valid {TIMING_PREFIX.strip()} line (stdout: {stdout.strip()[-200:]!r})"
    )


def failure_line(stderr: str, returncode: int) -> str:
    """One line for a failed runner: its own "sdxs_runner: error:" line, else ExecuTorch's last error
    log line, else the last line of stderr, else the exit status."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("sdxs_runner: error:"):
            own = ln[len("sdxs_runner: error:") :].strip()
            cause = next((x for x in reversed(lines) if x.startswith("E ") and "executorch:" in x), None)
            return f"{own} [{cause.split('] ', 1)[-1]}]" if cause else own
    if lines:
        return f"exit status {returncode}: {lines[-1][:300]}"
    return f"exit status {returncode} with no message" + (" (killed by a signal)" if returncode < 0 else "")
