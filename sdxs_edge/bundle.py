"""The bundle: lowered components + tokenizer files + manifest.json, the converters' output and the
runtimes' input.

    bundle/
      manifest.json        format version, source model, target, precision, resolution, sampler
                           constants, per-component file / sha256 / I/O spec, parity figures
      tokenizer/           CLIP BPE files (vocab.json, merges.txt, ...)
      text_encoder.<ext>   unet.<ext>   decoder.<ext>      (.onnx, .pte, .mlpackage)
      controlnet.<ext>     optional: a ControlNet whose residuals the U-Net takes as extra inputs
      encoder.<ext>        optional: the VAE encoder for image-to-image; the U-Net then takes a timestep

`MANIFEST_SCHEMA` is the JSON schema (also written to `manifest.schema.json` in the package);
`load_manifest` validates a bundle and checks every file's sha256, with one clear error per problem.
This module imports numpy and the standard library only: runtimes use it without PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from pathlib import Path
from typing import Any

from sdxs_edge.atomic import write_atomic
from sdxs_edge.errors import SDXSError

FORMAT = "sdxs-edge-bundle"
FORMAT_VERSION = 1
TARGETS = ("onnx", "executorch", "coreml")
PRECISIONS = ("fp32", "fp16", "int8")
COMPONENT_NAMES = ("encoder", "text_encoder", "controlnet", "unet", "decoder")  # every known component, in run order
REQUIRED_COMPONENTS = ("text_encoder", "unet", "decoder")  # what a runtime needs to generate
# "controlnet" adds a control image input; "encoder" image-to-image (its U-Net takes a timestep input).
# Format version 1 bundles without them still load.
OPTIONAL_COMPONENTS = ("encoder", "controlnet")


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
    "required": [
        "format",
        "format_version",
        "source",
        "target",
        "precision",
        "resolution",
        "sampler",
        "tokenizer",
        "components",
    ],
    "properties": {
        "format": {"const": FORMAT},
        "format_version": {"const": FORMAT_VERSION},
        "source": {
            "type": "object",
            "required": ["model", "sha256"],
            "properties": {"model": {"type": "string"}, "sha256": {"type": "string"}},
        },
        "target": {"enum": list(TARGETS)},
        "precision": {"enum": list(PRECISIONS)},
        "resolution": {"type": "integer", "minimum": 8},
        "sizes": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 8}}},
        "max_batch": {"type": "integer", "minimum": 1},
        "size_multiple": {"type": "integer", "minimum": 8},
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
        "scheduler": {  # a bundle with an encoder: the noise schedule image-to-image picks its timestep on
            "type": "object",
            "required": ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule"],
            "properties": {
                "num_train_timesteps": {"type": "integer", "minimum": 1},
                "beta_start": {"type": "number"},
                "beta_end": {"type": "number"},
                "beta_schedule": {"enum": ["scaled_linear", "linear"]},
            },
        },
        "tokenizer": {
            "type": "object",
            "required": ["dir", "max_length"],
            "properties": {"dir": {"type": "string"}, "max_length": {"type": "integer"}},
        },
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
        # The PyTorch reference images a runtime is checked against without PyTorch (`sdxs_edge.selfcheck`).
        "selfcheck": {
            "type": "object",
            "required": ["file", "sha256", "rng", "samples"],
            "properties": {
                "file": {"type": "string"},
                "sha256": {"type": "string"},
                "rng": {"type": "string"},
                "samples": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["prompts", "seed"],
                        "properties": {
                            "prompts": {"type": "array", "items": {"type": "string"}},
                            "seed": {"type": "integer", "minimum": 0},
                        },
                    },
                },
            },
        },
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
    """Check a manifest dict against the schema and the limits below; a newer or unknown format version
    gets its own message. Pure: the files are checked by `load_manifest` (`check_contained`)."""
    if not isinstance(manifest, dict):
        raise BundleError("manifest is not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"manifest format version {_short(manifest.get('format_version'))} is not supported (this sdxs-edge reads version {FORMAT_VERSION})"
        )
    _validate(manifest, MANIFEST_SCHEMA, "$")
    for name in manifest["components"]:
        if name not in COMPONENT_NAMES:
            raise BundleError(f"manifest: unknown component {_short(name)} (known: {', '.join(COMPONENT_NAMES)})")
    _check_limits(manifest)
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
                raise BundleError(
                    f"manifest: unet input {t['name']} {got['dtype']}{got['shape']} differs from the controlnet output {t['dtype']}{t['shape']}"
                )
    return manifest


# ---- limits and containment: a bundle is untrusted input ---------------------------------------------
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KiB
MAX_DIM = 1 << 16  # per tensor dimension
MAX_ELEMENTS = 1 << 31  # per tensor
MAX_RANK = 8
MAX_RESOLUTION = 8192
MAX_SELFCHECK_SAMPLES = 64  # the converter records 2
MAX_SIZES = 64  # sizes one bundle lists
MAX_BATCH = 256
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TENSOR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")


def _short(v: Any, n: int = 60) -> str:
    """repr of a manifest value for an error line: one line, at most `n` characters."""
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def check_sha256(value: Any, where: str) -> str:
    """A sha256 field: exactly 64 lowercase hex digits."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise BundleError(f"manifest {where}: {_short(value)} is not a sha256 (64 lowercase hex digits)")
    return value


def check_relative(rel: Any, where: str) -> str:
    """A path a manifest names inside its bundle: a relative, normalised POSIX path without `..`."""
    bad = (
        not isinstance(rel, str)
        or not rel
        or len(rel) > 255
        or "\0" in rel
        or "\\" in rel
        or rel.startswith("/")
        or (len(rel) > 1 and rel[1] == ":")  # a Windows drive
        or posixpath.normpath(rel) != rel
        or any(part in ("..", ".") for part in rel.split("/"))
    )
    if bad:
        raise BundleError(
            f"manifest {where}: {_short(rel)} must be a relative path inside the bundle (no '..', no absolute path)"
        )
    return rel


def _check_tensors(tensors: list, where: str) -> None:
    seen = set()
    for i, t in enumerate(tensors):
        name, shape = t["name"], t["shape"]
        if not _TENSOR_NAME.fullmatch(name):
            raise BundleError(
                f"manifest {where}[{i}].name: {_short(name)} is not a tensor name (letters, digits, '_', '.'; at most 128)"
            )
        if name in seen:
            raise BundleError(f"manifest {where}: tensor name {name!r} appears twice")
        seen.add(name)
        if not 1 <= len(shape) <= MAX_RANK or any(d > MAX_DIM for d in shape) or math.prod(shape) > MAX_ELEMENTS:
            raise BundleError(
                f"manifest {where}[{i}].shape: {_short(shape)} is out of bounds (rank 1-{MAX_RANK}, each dimension at most {MAX_DIM}, at most {MAX_ELEMENTS} elements)"
            )


def _check_limits(manifest: dict) -> None:
    """What the schema cannot say: path syntax, sha256 syntax, tensor names and sizes, finite numbers."""
    if not 8 <= manifest["resolution"] <= MAX_RESOLUTION:
        raise BundleError(f"manifest $.resolution: {manifest['resolution']} is out of bounds (8-{MAX_RESOLUTION})")
    _check_sizes(manifest)
    known = MANIFEST_SCHEMA["properties"]["sampler"]["properties"]
    for k, v in manifest["sampler"].items():
        if k not in known:  # runtimes build sampler.OneStepConstants from exactly these keys
            raise BundleError(f"manifest $.sampler: unknown key {_short(k)} (known: {', '.join(known)})")
        if isinstance(v, float) and not math.isfinite(v):
            raise BundleError(f"manifest $.sampler.{k}: {v} is not a finite number")
    if not 1 <= manifest["tokenizer"]["max_length"] <= 1024:
        raise BundleError(
            f"manifest $.tokenizer.max_length: {manifest['tokenizer']['max_length']} is out of bounds (1-1024)"
        )
    check_relative(manifest["tokenizer"]["dir"], "$.tokenizer.dir")
    check_sha256(manifest["source"]["sha256"], "$.source.sha256")
    for name, comp in manifest["components"].items():
        where = f"$.components.{name}"
        check_relative(comp["file"], f"{where}.file")
        check_sha256(comp["sha256"], f"{where}.sha256")
        _check_tensors(comp["inputs"], f"{where}.inputs")
        _check_tensors(comp["outputs"], f"{where}.outputs")
        extra = comp.get("external_data", [])
        if not isinstance(extra, list):
            raise BundleError(f"manifest {where}.external_data: expected array, got {type(extra).__name__}")
        for i, x in enumerate(extra):
            if not isinstance(x, dict):
                raise BundleError(f"manifest {where}.external_data[{i}]: expected object, got {type(x).__name__}")
            check_relative(x.get("file"), f"{where}.external_data[{i}].file")
            check_sha256(x.get("sha256"), f"{where}.external_data[{i}].sha256")
    _check_source_records(manifest)
    _check_selfcheck(manifest)
    _check_encoder(manifest)


def _check_selfcheck(manifest: dict) -> None:
    """The self-check record: its file's path and sha256, and 1-64 samples of one static batch each."""
    rec = manifest.get("selfcheck")
    if rec is None:
        return
    check_relative(rec["file"], "$.selfcheck.file")
    check_sha256(rec["sha256"], "$.selfcheck.sha256")
    batch = manifest["components"].get("unet", {}).get("inputs", [{}])[0].get("shape", [None])[0]
    if not 1 <= len(rec["samples"]) <= MAX_SELFCHECK_SAMPLES:
        raise BundleError(
            f"manifest $.selfcheck.samples: {len(rec['samples'])} samples; 1 to {MAX_SELFCHECK_SAMPLES} are allowed"
        )
    for i, s in enumerate(rec["samples"]):
        if len(s["prompts"]) != batch or s["seed"] >= 2**63:
            raise BundleError(
                f"manifest $.selfcheck.samples[{i}]: expected {batch} prompt(s) (the U-Net's batch) and a seed below 2**63"
            )


def _check_encoder(manifest: dict) -> None:
    """A bundle with an encoder records its noise schedule, and its U-Net (if any) takes the timestep third."""
    comps = manifest["components"]
    if "encoder" not in comps:
        return
    if "scheduler" not in manifest:
        raise BundleError("manifest: a bundle with an encoder must record its noise schedule ($.scheduler)")
    sch = manifest["scheduler"]
    if sch["num_train_timesteps"] > 100_000 or not all(math.isfinite(sch[k]) for k in ("beta_start", "beta_end")):
        raise BundleError("manifest $.scheduler: num_train_timesteps or betas out of bounds")
    unet = comps["unet"]["inputs"] if "unet" in comps else None  # a bundle of some components only: no U-Net
    if unet is not None and (len(unet) != 3 or unet[2]["name"] != "timestep" or len(unet[2]["shape"]) != 1):
        raise BundleError("manifest: a bundle with an encoder needs a unet whose third input is timestep (B,)")


def _check_sizes(manifest: dict) -> None:
    """The optional size list and batch bound (`sdxs_edge.sizes`): bounded, whole pairs, none twice."""
    sizes = manifest.get("sizes")
    if sizes is not None:
        if not 1 <= len(sizes) <= MAX_SIZES or any(len(s) != 2 or max(s) > MAX_RESOLUTION for s in sizes):
            raise BundleError(
                f"manifest $.sizes: {_short(sizes)} must be 1 to {MAX_SIZES} [width, height] pairs of 8-{MAX_RESOLUTION}"
            )
        if len({tuple(s) for s in sizes}) != len(sizes):
            raise BundleError(f"manifest $.sizes: {_short(sizes)} lists a size twice")
    if not 1 <= manifest.get("max_batch", 1) <= MAX_BATCH:
        raise BundleError(f"manifest $.max_batch: {manifest['max_batch']} is out of bounds (1-{MAX_BATCH})")


def _check_source_records(manifest: dict) -> None:
    """The records of what a bundle was converted from (read by the PyTorch reference only): optional
    sha256 fields are sha256s, recorded paths and ids are one-line strings."""
    cn = manifest["source"].get("controlnet")
    cfg = (manifest.get("conversion") or {}).get("config") or {}
    if cn is not None and not isinstance(cn, dict):
        raise BundleError(f"manifest $.source.controlnet: expected object, got {type(cn).__name__}")
    if not isinstance(cfg, dict):
        raise BundleError(f"manifest $.conversion.config: expected object, got {type(cfg).__name__}")
    for rec, key, where in (
        (cn or {}, "sha256", "$.source.controlnet.sha256"),
        (cn or {}, "weights_sha256", "$.source.controlnet.weights_sha256"),
        (cfg, "lora_sha256", "$.conversion.config.lora_sha256"),
    ):
        if rec.get(key) is not None:
            check_sha256(rec[key], where)
    for rec, key, where in (
        (manifest["source"], "model", "$.source.model"),
        (cn or {}, "model", "$.source.controlnet.model"),
        (cfg, "lora", "$.conversion.config.lora"),
    ):
        v = rec.get(key)
        if v is not None and (not isinstance(v, str) or not v or len(v) > 4096 or any(c in v for c in "\0\n\r")):
            raise BundleError(f"manifest {where}: {_short(v)} is not a model path or id")


def inside(bundle: str | Path, rel: str, where: str) -> Path:
    """The path `rel` names in `bundle`, after checking it stays there: relative and normalised
    (`check_relative`), and, following every symlink on the way, still inside the bundle folder; a
    folder's entries are checked the same way. Every file a runtime opens from a bundle comes from here."""
    check_relative(rel, where)
    root = Path(bundle).resolve()
    path = Path(bundle) / rel
    _check_resolves_inside(path, root, rel)
    if path.is_dir():
        for p in path.rglob("*"):
            _check_resolves_inside(p, root, str(p.relative_to(bundle)))
    return path


def _check_resolves_inside(path: Path, root: Path, rel: str) -> None:
    real = path.resolve()
    if real != root and root not in real.parents:
        raise BundleError(f"{root}: {rel} leads outside the bundle (to {real}); a bundle may only name its own files")


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
    """Read and validate `bundle/manifest.json`: its schema and limits (`validate_manifest`), that every
    path it names stays inside the bundle (`inside`), and with `verify`, every component's sha256.

    Args:
        bundle: the bundle directory.
        verify: hash every component file against the manifest (catches missing and altered files).
    """
    bundle = Path(bundle)
    mf = bundle / "manifest.json"
    if not mf.is_file():
        raise BundleError(f"{bundle} is not a bundle (no manifest.json)")
    inside(bundle, "manifest.json", "manifest.json")
    if mf.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mf}: {mf.stat().st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(mf.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise BundleError(f"{mf}: not UTF-8 text") from None
    except RecursionError:
        raise BundleError(f"{mf}: JSON nested too deeply") from None
    validate_manifest(manifest)
    check_contained(bundle, manifest, verify)
    return manifest


def check_contained(bundle: Path, manifest: dict, verify: bool = True) -> None:
    """Every path `manifest` names stays inside `bundle` and exists; with `verify`, each file's sha256."""
    tok = inside(bundle, manifest["tokenizer"]["dir"], "$.tokenizer.dir")
    if not (tok / "vocab.json").is_file():
        raise BundleError(f"{bundle}: tokenizer files are missing ({manifest['tokenizer']['dir']}/vocab.json)")
    for name, comp in manifest["components"].items():
        files = [(comp["file"], comp["sha256"], f"{name} file")]
        files += [(x["file"], x["sha256"], f"{name} external data file") for x in comp.get("external_data", [])]
        for rel, sha, what in files:
            f = inside(bundle, rel, f"$.components.{name}")
            if not f.exists():
                raise BundleError(f"{bundle}: {what} {rel} is missing")
            if verify and sha256_path(f) != sha:
                raise BundleError(f"{bundle}: {what} {rel} was altered (sha256 mismatch)")
    if "selfcheck" in manifest:
        selfcheck_path(bundle, manifest, verify)


def selfcheck_path(bundle: Path, manifest: dict, verify: bool = True) -> Path:
    """The self-check reference file `manifest` records (`sdxs_edge.selfcheck`): inside the bundle, present,
    and with `verify`, its sha256."""
    rec = manifest["selfcheck"]
    f = inside(bundle, rec["file"], "$.selfcheck.file")
    if not f.is_file():
        raise BundleError(f"{bundle}: self-check file {rec['file']} is missing")
    if verify and sha256_path(f) != rec["sha256"]:
        raise BundleError(f"{bundle}: self-check file {rec['file']} was altered (sha256 mismatch)")
    return f


def write_schema(path: str | Path) -> None:
    write_atomic(path, json.dumps(MANIFEST_SCHEMA, indent=2) + "\n")
