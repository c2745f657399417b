"""A deployment install without PyTorch: `pip install 'sdxs-edge[onnxruntime]'` from the local wheel into a
fresh virtualenv (no system site packages) gets numpy, Pillow, regex and onnxruntime and nothing of
torch, diffusers or transformers, and `sdxs-edge run` makes the same image there as in the full install.

Slow (`make test-slow`): building the wheel and the virtualenv takes one to five minutes on two cores
(the dependency wheels are downloaded once into build/deploy-wheelhouse/, then installed offline).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_cache import cached_bundle, need

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / "build" / "deploy-wheelhouse"
PROMPT = "a small red circle at the top on a white background"
SOURCES = ("pyproject.toml", "README.md", "sdxs_edge", "runtimes", "converters", "training", "benchmarks")
NOT_INSTALLED = ("torch", "diffusers", "transformers", "safetensors", "executorch")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd[:4])} ...: {proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def deploy_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with the local wheel and its onnxruntime extra, installed offline."""
    tmp = tmp_path_factory.mktemp("deploy")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:  # a copy, so building the wheel writes nothing into the checkout
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build"))
        else:
            shutil.copy2(p, src / name)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "wheel"),
            str(src),
        ]
    )
    (wheel,) = (tmp / "wheel").glob("sdxs_edge-*.whl")
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "-c",
            str(ROOT / "constraints.txt"),
            "-d",
            str(WHEELHOUSE),
            f"{wheel}[onnxruntime]",
        ]
    )
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--find-links",
            str(WHEELHOUSE),
            f"{wheel}[onnxruntime]",
        ]
    )
    return venv


def test_onnxruntime_extra_installs_no_torch(deploy_venv):
    listed = _run([str(deploy_venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    names = {line.split("==")[0].replace("_", "-") for line in listed.splitlines()}
    assert {"numpy", "pillow", "regex", "onnxruntime", "sdxs-edge"} <= names, names
    assert not names & set(NOT_INSTALLED), names & set(NOT_INSTALLED)


def test_run_onnx_bundle_without_torch(deploy_venv, tmp_path):
    """`sdxs-edge run` in the torch-free install writes the full install's image; a command that needs
    PyTorch says which extra to install, in one line."""
    need("onnxruntime")
    from PIL import Image

    import runtimes
    from runtimes.base import to_uint8

    bundle = cached_bundle("tiny", "onnx", "fp32")
    exe = str(deploy_venv / "bin" / "sdxs-edge")
    out = tmp_path / "x.png"
    _run([exe, "run", str(bundle), PROMPT, "--runtime", "onnxruntime", "--seed", "3", "--out", str(out)], cwd=tmp_path)
    with runtimes.load(bundle, "onnxruntime") as s:
        want = to_uint8(s.generate_arrays(PROMPT, seed=3).image)[0]
    assert np.array_equal(np.asarray(Image.open(out)), want)
    probe = f"import sys, runtimes; runtimes.load(sys.argv[1], 'onnxruntime').generate('x'); print(sorted(m for m in sys.modules if m.split('.')[0] in {NOT_INSTALLED!r}))"
    assert _run([str(deploy_venv / "bin" / "python"), "-c", probe, str(bundle)], cwd=tmp_path).stdout.strip() == "[]"
    proc = subprocess.run(
        [exe, "generate", PROMPT, "--out", str(tmp_path / "g.png")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "sdxs-edge[torch]" in proc.stderr, proc.stderr
