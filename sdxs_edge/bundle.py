"""The bundle: lowered components + tokenizer files + manifest.json, the converters' output and the
runtimes' input.

    bundle/
      manifest.json        format version, source model, target, precision, resolution, sampler
                           constants, per-component file / sha256 / I/O spec, parity figures
      tokenizer/           CLIP BPE files (vocab.json, merges.txt, ...)
      text_encoder.<ext>   unet.<ext>   decoder.<ext>      (.onnx, .pte, .mlpackage)
      controlnet.<ext>     optional: a ControlNet whose residuals the U-Net takes as extra inputs

`MANIFEST_SCHEMA` is the JSON schema (also written to `manifest.schema.json` in the package);
`load_manifest` validates a bundle and checks every file's sha256, with one clear error per problem.
This module imports numpy and the standard library only: runtimes use it without PyTorch.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sdxs_edge.atomic import write_atomic
from sdxs_edge.errors import SDXSError

FORMAT = "sdxs-edge-bundle"
FORMAT_VERSION = 1
TARGETS = ("onnx", "executorch", "coreml")
PRECISIONS = ("fp32", "fp16", "int8")
COMPONENT_NAMES = ("text_encoder", "controlnet", "unet", "decoder")  # every known component, in run order
REQUIRED_COMPONENTS = ("text_encoder", "unet", "decoder")  # what a runtime needs to generate
OPTIONAL_COMPONENTS = ("controlnet",)  # adds a control image input (format version 1 bundles without it still load)


class BundleError(SDXSError):
    """A bundle is missing, altered, or of an unknown format."""


_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "dtype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
        "dtype": {"enum": ["float32", "float16", "int32", "int64"]},
    },
}
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sdxs-edge bundle manifest",
    "type": "object",
    "required": ["format", "format_version", "source", "target", "precision", "resolution", "sampler", "tokenizer", "components"],
    "properties": {
        "format": {"const": FORMAT},
        "format_version": {"const": FORMAT_VERSION},
        "source": {"type": "object", "required": ["model", "sha256"], "properties": {"model": {"type": "string"}, "sha256": {"type": "string"}}},
        "target": {"enum": list(TARGETS)},
        "precision": {"enum": list(PRECISIONS)},
        "resolution": {"type": "integer", "minimum": 8},
        "sampler": {
            "type": "object",
            "required": ["timestep", "sigma", "input_scale", "prediction_type", "latent_scaling"],
            "properties": {
                "timestep": {"type": "integer"},
                "sigma": {"type": "number"},
                "input_scale": {"type": "number"},
                "prediction_type": {"enum": ["epsilon", "v_prediction"]},
                "latent_scaling": {"type": "number"},
            },
        },
        "tokenizer": {"type": "object", "required": ["dir", "max_length"], "properties": {"dir": {"type": "string"}, "max_length": {"type": "integer"}}},
        "components": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["file", "sha256", "inputs", "outputs"],
                "properties": {
                    "file": {"type": "string"},
                    "sha256": {"type": "string"},
                    "inputs": {"type": "array", "items": _TENSOR},
                    "outputs": {"type": "array", "items": _TENSOR},
                },
            },
        },
        "parity": {"type": "object"},
        "conversion": {"type": "object"},
    },
}


def _validate(obj: Any, schema: dict, where: str) -> None:
    """A small JSON-schema subset validator (type, required, properties, items, enum, const, minimum)."""
    types = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float)}
    if "const" in schema and obj != schema["const"]:
        raise BundleError(f"manifest {where}: expected {schema['const']!r}, got {obj!r}")
    if "enum" in schema and obj not in schema["enum"]:
        raise BundleError(f"manifest {where}: {obj!r} is not one of {schema['enum']}")
    t = schema.get("type")
    if t and (not isinstance(obj, types[t]) or (t in ("integer", "number") and isinstance(obj, bool))):
        raise BundleError(f"manifest {where}: expected {t}, got {type(obj).__name__}")
    if "minimum" in schema and obj < schema["minimum"]:
        raise BundleError(f"manifest {where}: {obj} < {schema['minimum']}")
    if isinstance(obj, dict):
        for k in schema.get("required", []):
            if k not in obj:
                raise BundleError(f"manifest {where}: missing key {k!r}")
        for k, v in obj.items():
            sub = schema.get("properties", {}).get(k) or schema.get("additionalProperties")
            if isinstance(sub, dict):
                _validate(v, sub, f"{where}.{k}")
    if isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            _validate(v, schema["items"], f"{where}[{i}]")


def validate_manifest(manifest: dict) -> dict:
    """Check a manifest dict against the schema; a newer or unknown format version gets its own message."""
    if not isinstance(manifest, dict):
        raise BundleError("manifest is not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"manifest format version {manifest.get('format_version')!r} is not supported (this sdxs-edge reads version {FORMAT_VERSION})")
    _validate(manifest, MANIFEST_SCHEMA, "$")
    for name in manifest["components"]:
        if name not in COMPONENT_NAMES:
            raise BundleError(f"manifest: unknown component {name!r} (known: {', '.join(COMPONENT_NAMES)})")
    comps = manifest["components"]
    if "controlnet" in comps:
        if "unet" not in comps:
            raise BundleError("manifest: a controlnet component feeds the U-Net, but the bundle has no unet")
        unet_inputs = {t["name"]: t for t in comps["unet"]["inputs"]}
        for t in comps["controlnet"]["outputs"]:
            got = unet_inputs.get(t["name"])
            if got is None:
                raise BundleError(f"manifest: the unet does not declare the ControlNet residual input {t['name']!r}")
            if got["shape"] != t["shape"] or got["dtype"] != t["dtype"]:
                raise BundleError(f"manifest: unet input {t['name']} {got['dtype']}{got['shape']} differs from the controlnet output {t['dtype']}{t['shape']}")
    return manifest


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory (e.g. an .mlpackage) as the hash of its sorted files' paths and bytes."""
    path = Path(path)
    if not path.exists():  # rglob of a missing path yields nothing: it would hash as an empty folder
        raise FileNotFoundError(f"{path} does not exist")
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_manifest(bundle: str | Path, verify: bool = True) -> dict:
    """Read and validate `bundle/manifest.json`; with `verify`, check every component's sha256.

    Args:
        bundle: the bundle directory.
        verify: hash every component file against the manifest (catches missing and altered files).
    """
    bundle = Path(bundle)
    mf = bundle / "manifest.json"
    if not mf.is_file():
        raise BundleError(f"{bundle} is not a bundle (no manifest.json)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf}: invalid JSON ({e.msg} at line {e.lineno})") from None
    validate_manifest(manifest)
    if not (bundle / manifest["tokenizer"]["dir"] / "vocab.json").is_file():
        raise BundleError(f"{bundle}: tokenizer files are missing ({manifest['tokenizer']['dir']}/vocab.json)")
    for name, comp in manifest["components"].items():
        f = bundle / comp["file"]
        if not f.exists():
            raise BundleError(f"{bundle}: {name} file {comp['file']} is missing")
        if verify and sha256_path(f) != comp["sha256"]:
            raise BundleError(f"{bundle}: {name} file {comp['file']} was altered (sha256 mismatch)")
        for extra in comp.get("external_data", []):  # weights beside an ONNX program, checked like it
            x = bundle / extra["file"]
            if not x.is_file():
                raise BundleError(f"{bundle}: {name} external data file {extra['file']} is missing")
            if verify and sha256_path(x) != extra["sha256"]:
                raise BundleError(f"{bundle}: {name} external data file {extra['file']} was altered (sha256 mismatch)")
    return manifest


def write_schema(path: str | Path) -> None:
    write_atomic(path, json.dumps(MANIFEST_SCHEMA, indent=2) + "\n")
