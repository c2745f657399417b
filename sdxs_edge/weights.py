"""safetensors file checks: catch truncated or corrupt weights before a loader does, naming the file."""
from __future__ import annotations

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
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelLoadError(f"{path}: corrupt safetensors file (unreadable header)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ModelLoadError(f"{path}: truncated or corrupt safetensors file ({size} bytes, header says {8 + n + end})")
    return header
