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
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelLoadError(f"{path}: corrupt safetensors file (unreadable header)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ModelLoadError(f"{path}: truncated or corrupt safetensors file ({size} bytes, header says {8 + n + end})")
    return header


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
