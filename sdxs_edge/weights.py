"""safetensors file checks: catch truncated or corrupt weights before a loader does, naming the file; and
the weights hash bundles record (`modules_sha256`)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from sdxs_edge.errors import ModelLoadError


def check_safetensors(path: str | Path) -> dict:
    """Validate a safetensors file's header and length; returns the header. ModelLoadError names the file.

    The format is an 8-byte little-endian header length, a JSON header with each tensor's byte range,
    then the data; a file cut short or with a garbled header fails here with a clear message.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path}: corrupt safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ModelLoadError(f"{path}: corrupt safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ModelLoadError(f"{path}: corrupt safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors file (the header is not a JSON object)")
    end = _check_entries(path, header)
    if 8 + n + end != size:
        raise ModelLoadError(f"{path}: truncated or corrupt safetensors file ({size} bytes, header says {8 + n + end})")
    return header


_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _check_entries(path: Path, header: dict) -> int:
    """Each tensor entry's dtype, shape and byte range, and that the ranges tile the data from 0 without
    gaps or overlaps (the safetensors rules); returns the data length the header declares."""
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ModelLoadError(f"{path}: corrupt safetensors file (__metadata__ is not a string map)")
    spans = []
    for name, v in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(v, dict)
            and v.get("dtype") in _DTYPE_BYTES
            and isinstance(v.get("shape"), list)
            and isinstance(v.get("data_offsets"), list)
        )
        ok = (
            ok
            and all(type(d) is int and d >= 0 for d in v["shape"])
            and len(v["data_offsets"]) == 2
            and all(type(o) is int for o in v["data_offsets"])
        )
        if not ok:
            raise ModelLoadError(f"{path}: corrupt safetensors file (bad entry for tensor {name[:80]!r})")
        begin, stop = v["data_offsets"]
        numel = 1
        for d in v["shape"]:
            numel *= d
        if not 0 <= begin <= stop or stop - begin != numel * _DTYPE_BYTES[v["dtype"]]:
            raise ModelLoadError(
                f"{path}: corrupt safetensors file (tensor {name[:80]!r}: byte range {begin}-{stop} does not hold {v['dtype']}{v['shape']})"
            )
        spans.append((begin, stop))
    at = 0
    for begin, stop in sorted(spans):
        if begin != at:
            raise ModelLoadError(
                f"{path}: corrupt safetensors file (tensor data overlaps or leaves a gap at byte {at})"
            )
        at = stop
    return at


def modules_sha256(modules: dict) -> str:
    """sha256 over named modules' state dicts: per module and sorted tensor name, the name, dtype, shape
    and raw bytes. `converters.api.weights_sha256` hashes a pipeline this way, bundles record a ControlNet
    as {"controlnet": cn}."""
    import torch

    h = hashlib.sha256()
    for mod_name, module in modules.items():
        for k, t in sorted(module.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{mod_name}.{k}|{t.dtype}|{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
