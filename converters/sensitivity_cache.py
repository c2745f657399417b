"""What the int8 sensitivity pass measured, kept on disk so that converting the same model again skips it.

The pass quantizes a component once per candidate set of nodes kept in float and scores each on held-out
samples; on the sdxs-512 U-Net that is most of a conversion. An entry holds, for one component, the
quantized candidates, their local re-quantization ranking and the score of every candidate set evaluated,
under a key that is the sha256 of everything those figures depend on: the float model as the backend
quantizes it (`model_digest`), the calibration and held-out samples and their references (as the pass
scores them), the component, the backend's and the pass's sources, the library versions and the CPU class
(`sdxs_edge.cpu.host_class`: int8 kernels, hence the scores, differ by class). A key names
figures, never a decision: the search that reads them runs each time, so other budgets or targets reuse
the same entry.

Entries live in `$SDXS_EDGE_CACHE/sensitivity` (default `~/.cache/sdxs-edge/sensitivity`), one JSON file
per component and key, written through `sdxs_edge.atomic`. An entry is a file anyone could have edited:
one that does not parse, names another key or holds a malformed field is ignored with a warning and
overwritten, and a cached score only ever ranks candidates: the bundle is always quantized and checked
anew. `SDXS_EDGE_SENSITIVITY_CACHE=off` turns the cache off (`benchmarks.int8_forms` swaps the quantizer's
arguments behind the converter's back, so it does).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from sdxs_edge.atomic import write_atomic
from sdxs_edge.errors import SDXSError

FORMAT = "sdxs-edge-sensitivity-cache"
VERSION = 1
SWITCH_ENV = "SDXS_EDGE_SENSITIVITY_CACHE"
KEY_PACKAGES = ("torch", "torchao", "executorch", "onnx", "onnxruntime", "numpy")
SOURCES = ("base.py", "parity.py", "sensitivity.py", "sensitivity_cache.py", "observers.py")  # with the backend's


def cache_dir() -> Path | None:
    """The folder entries live in; None when the cache is off."""
    if os.environ.get(SWITCH_ENV, "").strip().lower() == "off":
        return None
    from sdxs_edge.cache import cache_root

    return cache_root() / "sensitivity"


def _update_arrays(h, arrays: Iterable) -> None:
    for x in arrays:
        if isinstance(x, (tuple, list)):
            _update_arrays(h, x)
            continue
        a = np.ascontiguousarray(x)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())


def content_key(job, model_digest: str, backend_file: str, fit: Sequence, held_out: Sequence, refs: Sequence) -> str:
    """sha256 of what the pass's figures depend on (module docstring); `refs` as the pass scores them."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256(f"{FORMAT}/{VERSION}\0{job.name}\0{job.config.target}\0{model_digest}\0".encode())
    here = Path(__file__).resolve().parent
    for f in sorted({*SOURCES, Path(backend_file).name}):
        h.update(f.encode() + b"\0" + (here / f).read_bytes())
    for name in KEY_PACKAGES:
        try:
            h.update(f"{name}={version(name)}\0".encode())
        except PackageNotFoundError:
            h.update(f"{name}=absent\0".encode())
    from sdxs_edge.cpu import host_class

    h.update(f"cpu={host_class()}\0".encode())
    for part in (fit, held_out, refs):
        h.update(f"{len(part)}\0".encode())
        _update_arrays(h, part)
    return h.hexdigest()


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _names(x) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _check(data, key: str) -> str | None:
    """Why `data` is not a usable entry for `key`; None when it is."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        return "not a sensitivity cache entry of this version"
    if data.get("key") != key:
        return "it names another key"
    ev = data.get("evaluations")
    if not isinstance(ev, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in ev.items()):
        return "malformed evaluations"
    cands, ranking = data.get("candidates"), data.get("local_ranking")
    if cands is not None and not (
        isinstance(cands, list)
        and all(isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and _names(c[1]) for c in cands)
    ):
        return "malformed candidates"
    if ranking is not None and not (
        isinstance(ranking, list)
        and all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and _is_number(r[1]) for r in ranking)
    ):
        return "malformed local ranking"
    return None


class Entry:
    """One component's cached figures (empty when there is no usable entry), saved after each new one."""

    def __init__(self, folder: Path | None, component: str, key: str):
        self.key = key
        self.path = None if folder is None else folder / f"{component}-{key[:32]}.json"
        self.data = {"format": FORMAT, "version": VERSION, "key": key, "component": component}
        self.data.update(evaluations={}, candidates=None, local_ranking=None)
        self.hits = 0
        if self.path is not None and self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            why = _check(data, self.key)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            why = f"unreadable ({type(e).__name__})"
        if why is not None:
            warnings.warn(
                f"ignoring the sensitivity cache entry {self.path}: {why}; it will be rewritten", stacklevel=3
            )
            return
        self.data.update(evaluations=data["evaluations"], candidates=data["candidates"])
        self.data["local_ranking"] = data["local_ranking"]

    def save(self) -> None:
        if self.path is None:
            return
        try:
            write_atomic(self.path, json.dumps(self.data, indent=1) + "\n")
        except (OSError, SDXSError) as e:  # a cache that cannot be written costs time, never the conversion
            warnings.warn(f"could not write the sensitivity cache entry {self.path}: {e}", stacklevel=3)

    @staticmethod
    def _name(excluded: Sequence[str]) -> str:
        return "\n".join(excluded)

    def score(self, excluded: Sequence[str]) -> float | None:
        s = self.data["evaluations"].get(self._name(excluded))
        if s is not None:
            self.hits += 1
        return None if s is None else float(s)

    def put_score(self, excluded: Sequence[str], snr: float) -> None:
        self.data["evaluations"][self._name(excluded)] = float(snr) if not math.isnan(snr) else float("-inf")
        self.save()

    def get(self, field: str):
        return self.data[field]

    def put(self, field: str, value) -> None:
        self.data[field] = value
        self.save()
