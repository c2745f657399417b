"""Converted test bundles kept between runs under build/test-bundles/ (shared by the runtime tests).

A bundle's key is the sha256 of the converters/ and sdxs_edge/ sources and the backend package versions
(plus whatever else the caller names): lowering the tiny model to ExecuTorch takes about a minute on two
cores, so only the first run after a change pays for it. Every use still verifies each file's sha256
through the manifest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_CACHE = ROOT / "build" / "test-bundles"
STALE_AFTER_S = 3600  # entries of other keys unused this long are removed (a test run takes minutes)
KEY_PACKAGES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "executorch", "torchao", "coremltools")
# sdxs_edge modules no conversion reads (the CLI, reports, the SHAPES-64 evaluator, the noise stream) stay
# out of the key.
NOT_IN_KEY = {"cli.py", "cli_args.py", "info.py", "evaluate.py", "torch_rng.py"}


def source_key(label: str, *extra: str) -> str:
    """16 hex digits naming one cache entry: `label`, the sources conversion reads, `extra` texts, versions."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256(label.encode())
    sources = [
        *(ROOT / "converters").rglob("*.py"),
        *(f for f in (ROOT / "sdxs_edge").rglob("*.py") if f.name not in NOT_IN_KEY),
    ]
    for f in sorted(sources):
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    for text in extra:
        h.update(text.encode())
    for name in KEY_PACKAGES:
        try:
            h.update(f"{name}={version(name)}".encode())
        except PackageNotFoundError:
            h.update(f"{name}=absent".encode())
    return h.hexdigest()[:16]


def prune(keep: Path, pattern: str) -> None:
    """Mark `keep` in use and remove entries matching `pattern` that no run has used for STALE_AFTER_S."""
    os.utime(keep)  # a concurrent run with other sources must not prune it
    for stale in BUNDLE_CACHE.glob(pattern):
        if stale != keep and time.time() - stale.stat().st_mtime > STALE_AFTER_S:
            shutil.rmtree(stale, ignore_errors=True)


def need(module: str) -> None:
    """Skip the test when a backend package is not installed."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the {module} package is not installed")


SHIPPED_MODEL = ROOT / "sdxs_edge" / "default_model"


def cached_bundle(model: str, target: str, precision: str, label: str = "", **options) -> Path:
    """A converted bundle of `model` (a preset, a folder, or "default": the shipped model `SHIPPED_MODEL`,
    trained) kept under build/test-bundles/, built on first use; `options` go to `convert` (name them in
    `label`, which goes into the entry's name). Skips when the backend package is absent; a conversion that
    fails is a test error."""
    from converters.api import convert

    need({"onnx": "onnxruntime", "executorch": "executorch", "coreml": "coremltools"}[target])
    name = Path(model).name if os.sep in model else model
    prefix = f"{name}-{target}-{precision}-{label + '-' if label else ''}"
    out = BUNDLE_CACHE / (
        prefix + source_key(f"{model}|{target}|{precision}", *([repr(sorted(options.items()))] if options else []))
    )
    if not (out / "manifest.json").is_file():
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        source = str(SHIPPED_MODEL) if model == "default" else model
        convert(source, target, precision, tmp, progress=False, **options)
        try:
            os.rename(tmp, out)
        except OSError:  # another test run finished the same bundle first
            shutil.rmtree(tmp)
    prune(out, f"*{prefix}*")
    return out


def shipped_bundle(target: str, precision: str) -> Path:
    """The embedded default model converted to `target` / `precision` (with its encoder), cached as above."""
    return cached_bundle("default", target, precision)
