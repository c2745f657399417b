"""What `sdxs-edge serve` loads: bundles on runtimes, each one `Entry` with its own worker thread.

A request names an entry by `id` (from `GET /v1/models`); the server never reads a path that comes from
a request. Entries come from the bundle folders given on the command line, or, with none, from the
embedded model and its canny ControlNet and outline LoRA, converted once into the cache folder
(`cached_bundles`) and reused afterwards. Only the conversion imports PyTorch (through `converters`);
loading a cached bundle needs numpy, Pillow and the runtime's backend.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import sdxs_edge
from sdxs_edge.bundle import BundleError, load_manifest
from sdxs_edge.cache import cache_root  # noqa: F401 (server.cli reads it here)
from sdxs_edge.errors import SDXSError

DEFAULT_MODEL = Path(sdxs_edge.__file__).resolve().parent / "default_model"
MODELS_DIR = DEFAULT_MODEL.parents[1] / "models"  # the trained ControlNet and LoRA of the embedded model (a checkout)
DEFAULT_CONTROLNET = MODELS_DIR / "shapes-controlnet-canny"
DEFAULT_LORA = MODELS_DIR / "shapes-lora-outline"
# Package versions that change what a conversion writes: a cached bundle is rebuilt when one changes.
KEY_PACKAGES = ("torch", "executorch", "onnx", "onnxruntime", "torchao")


@dataclass(frozen=True)
class Variant:
    """One bundle of the embedded model the default server builds.

    Args:
        name: the bundle folder and the model id.
        model: the model folder (diffusers layout) to convert.
        controlnet: the ControlNet folder fused in as a component (sketch-to-image), or None.
        lora: the style LoRA folder fused into the U-Net, or None.
    """

    name: str
    model: Path = DEFAULT_MODEL
    controlnet: Path | None = None
    lora: Path | None = None


def default_variants() -> list[Variant]:
    """The embedded model, plus its canny ControlNet and outline LoRA where this checkout has them."""
    out = [Variant("sdxs-shapes")]
    lora = DEFAULT_LORA if DEFAULT_LORA.is_dir() else None
    cn = DEFAULT_CONTROLNET if DEFAULT_CONTROLNET.is_dir() else None
    if lora:
        out.append(Variant("sdxs-shapes-outline", lora=lora))
    if cn:
        out.append(Variant("sdxs-shapes-canny", controlnet=cn))
    if cn and lora:
        out.append(Variant("sdxs-shapes-canny-outline", controlnet=cn, lora=lora))
    return out


def fastest_target() -> tuple[str, str]:
    """(target, precision) of the fastest CPU path installed: int8 ExecuTorch (1.4 ms per 64x64 image,
    benchmarks/results/default_model-64-x86-64-avx512-vnni), else int8 ONNX on onnxruntime (2.1 ms)."""
    if importlib.util.find_spec("executorch") is not None:
        return "executorch", "int8"
    if importlib.util.find_spec("onnxruntime") is not None:
        return "onnx", "int8"
    raise SDXSError(
        "no CPU runtime is installed to convert the embedded model for: install the executorch or onnx extra, or pass a bundle folder"
    )


def _variant_key(v: Variant, target: str, precision: str) -> str:
    """16 hex digits over the model, ControlNet and LoRA weights, the target and the package versions."""
    from importlib.metadata import PackageNotFoundError, version

    from sdxs_edge.bundle import sha256_path

    h = hashlib.sha256(f"{target}|{precision}".encode())
    for p in (v.model, v.controlnet, v.lora):
        h.update((sha256_path(p) if p else "-").encode())
    for name in KEY_PACKAGES:
        try:
            h.update(f"{name}={version(name)}".encode())
        except PackageNotFoundError:
            h.update(f"{name}=absent".encode())
    return h.hexdigest()[:16]


def cached_bundles(variants: list[Variant], cache: Path, target: str, precision: str, log=print) -> list[Path]:
    """The variants' bundles in `cache`, converting the missing ones once (a line each).

    Args:
        variants: what to convert (`default_variants()` for the embedded model).
        cache: the cache folder (bundles go under `cache/serve/`).
        target, precision: what to convert to (see `fastest_target`).
        log: where progress lines go.
    """
    out = []
    for i, v in enumerate(variants, 1):
        folder = cache / "serve" / f"{v.name}-{target}-{precision}-{_variant_key(v, target, precision)}" / v.name
        if (folder / "manifest.json").is_file():
            log(f"[{i}/{len(variants)}] {v.name}: {target} {precision} bundle from the cache {folder}")
        else:
            log(
                f"[{i}/{len(variants)}] {v.name}: converting {v.model.name}{_extras(v)} to {target} {precision} once (reused afterwards from {folder.parent})"
            )
            t = time.perf_counter()
            _convert(v, target, precision, folder)
            log(f"[{i}/{len(variants)}] {v.name}: converted in {time.perf_counter() - t:.0f} s")
        out.append(folder)
    return out


def _extras(v: Variant) -> str:
    parts = [f"ControlNet {v.controlnet.name}" if v.controlnet else "", f"LoRA {v.lora.name}" if v.lora else ""]
    return "".join(f" + {p}" for p in parts if p)


def _convert(v: Variant, target: str, precision: str, folder: Path) -> None:
    """Convert into the cache; `convert` writes the bundle atomically, so an interrupted conversion leaves
    no bundle behind (its temporaries are removed by the next conversion into the same place)."""
    from converters.api import convert

    convert(
        str(v.model), target, precision, folder, progress=False, lora=v.lora, controlnet=v.controlnet, overwrite=True
    )


@dataclass
class Entry:
    """One bundle loaded on one runtime: what `GET /v1/models` lists and a request names by `id`.

    Args:
        id: the model id requests use.
        bundle: the bundle folder (chosen at start; never from a request).
        runtime: the runtime's registry name.
        session: the loaded `runtimes.base.Session`.
        base: the source model's name (the page groups variants of one model under it).
        style: the fused LoRA's name, or None.
        load_s: seconds the session took to load and warm up.
    """

    id: str
    bundle: Path
    runtime: str
    session: object
    base: str
    style: str | None
    load_s: float
    worker: object = field(default=None, repr=False)

    @property
    def resolution(self) -> int:
        return int(self.session.manifest["resolution"])

    @property
    def has_controlnet(self) -> bool:
        return bool(self.session.has_controlnet)

    def describe(self) -> dict:
        """The `/v1/models` record (OpenAI's `id`, `object`, `created`, `owned_by`, plus what the page needs)."""
        m = self.session.manifest
        return {
            "id": self.id,
            "object": "model",
            "created": int(self.bundle.stat().st_mtime),
            "owned_by": "sdxs-edge",
            "base": self.base,
            "style": self.style,
            "controlnet": self.has_controlnet,
            "runtime": self.runtime,
            "target": m["target"],
            "precision": m["precision"],
            "resolution": self.resolution,
            "sizes": [f"{self.resolution}x{self.resolution}"],
            "batch": int(self.session.batch),
        }


def _style(manifest: dict) -> str | None:
    lora = manifest.get("conversion", {}).get("config", {}).get("lora")
    if not lora:
        return None
    p = Path(lora)
    return (p.parent.name if p.name.endswith(".safetensors") and p.parent.name else p.stem).removeprefix("shapes-lora-")


def load_entries(bundles: list[Path], runtimes_: list[str] | None, log=print) -> list[Entry]:
    """Open every bundle on every runtime asked for (default: the one native to its target).

    Args:
        bundles: bundle folders.
        runtimes_: runtime names, or None for each bundle's native runtime.
        log: where the load lines go.
    """
    import runtimes
    from runtimes.base import UnsupportedTargetError

    entries: list[Entry] = []
    for b in bundles:
        b = Path(b)
        if not (b / "manifest.json").is_file():
            raise BundleError(
                f"{b} is not a bundle folder (no manifest.json); convert a model first with `sdxs-edge convert`"
            )
        target = load_manifest(b, verify=False)["target"]
        names = runtimes_ or [runtimes.DEFAULT_FOR_TARGET.get(target, "torch")]
        for rt in names:
            t = time.perf_counter()
            try:
                session = runtimes.load(b, rt)
            except UnsupportedTargetError:
                if runtimes_ and len(runtimes_) > 1:
                    continue  # several runtimes asked for: each bundle runs on those that can run it
                raise
            eid = b.name if len(names) == 1 else f"{b.name}@{rt}"
            if any(e.id == eid for e in entries):
                raise SDXSError(f"two bundles would have the id {eid!r}: give bundle folders distinct names")
            warm_up(session)
            m = session.manifest
            entry = Entry(eid, b, rt, session, Path(m["source"]["model"]).name, _style(m), time.perf_counter() - t)
            log(
                f"loaded {eid}: {m['target']} {m['precision']} {entry.resolution}px on {rt}{' + ControlNet' if entry.has_controlnet else ''}{f' + LoRA {entry.style}' if entry.style else ''} ({entry.load_s:.2f} s)"
            )
            entries.append(entry)
    if not entries:
        raise SDXSError("no bundle could be loaded on the runtimes asked for")
    return entries


def warm_up(session) -> None:
    """One generation at load (a blank control image for a ControlNet), so the first request pays no
    first-run cost (allocations, kernel selection)."""
    import numpy as np

    control = np.zeros(session.control_shape, np.float32) if session.has_controlnet else None
    session.generate_arrays("a small red circle at the center on a white background", seed=0, control_image=control)


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
