"""A deployment install without PyTorch: `pip install 'sdxs-edge[onnxruntime,serve]'` from the local wheel
into a fresh virtualenv (no system site packages) gets numpy, Pillow, regex, onnxruntime, FastAPI and
uvicorn and nothing of torch, diffusers or transformers; `sdxs-edge run` makes the same image there as in
the full install, `sdxs-edge parity --reference none` passes, and `sdxs-edge serve` serves a bundle on a
loopback port.

Slow (`make test-slow`): building the wheel and the virtualenv takes one to five minutes on two cores
(the dependency wheels are downloaded once into build/deploy-wheelhouse/, then installed offline).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from bundle_cache import cached_bundle, need

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / "build" / "deploy-wheelhouse"
PROMPT = "a small red circle at the top on a white background"
SOURCES = ("pyproject.toml", "README.md", "sdxs_edge", "runtimes", "converters", "training", "benchmarks", "server")
EXTRAS = "[onnxruntime,serve]"
NOT_INSTALLED = ("torch", "diffusers", "transformers", "safetensors", "executorch")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd[:4])} ...: {proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def deploy_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with the local wheel and its onnxruntime and serve extras, installed offline."""
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
            f"{wheel}{EXTRAS}",
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
            f"{wheel}{EXTRAS}",
        ]
    )
    return venv


def test_onnxruntime_extra_installs_no_torch(deploy_venv):
    listed = _run([str(deploy_venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    names = {line.split("==")[0].replace("_", "-") for line in listed.splitlines()}
    assert {"numpy", "pillow", "regex", "onnxruntime", "fastapi", "uvicorn", "sdxs-edge"} <= names, names
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


def test_selfcheck_without_torch(deploy_venv, tmp_path):
    """`sdxs-edge parity --reference none` in the torch-free install passes on the shipped model's bundle
    (trained: the image floor is enforced) and reports the CPU class."""
    need("onnxruntime")
    bundle = cached_bundle("default", "onnx", "fp32")
    exe = str(deploy_venv / "bin" / "sdxs-edge")
    out = _run([exe, "parity", str(bundle), "--runtime", "onnxruntime", "--reference", "none"], cwd=tmp_path).stdout
    assert out.startswith("self-check  onnxruntime") and "CPU class " in out and "PASSED" in out, out


def _serve_url(proc: subprocess.Popen, deadline_s: float = 120.0) -> str:
    """The URL `serve` prints once it listens (it binds before loading, prints after the warm-up)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if line.startswith("sdxs-edge serve: "):
            return line.split()[2].rstrip("/")
    raise AssertionError("serve printed no URL in time")


def test_serve_onnx_bundle_without_torch(deploy_venv, tmp_path):
    """`sdxs-edge serve` in the torch-free install, on 127.0.0.1 and a free port: one OpenAI-shaped request
    returns the full install's image for that seed; then the server stops on SIGINT (Ctrl-C)."""
    need("onnxruntime")
    from PIL import Image

    import runtimes
    from runtimes.base import to_uint8

    bundle = cached_bundle("tiny", "onnx", "fp32")
    exe = str(deploy_venv / "bin" / "sdxs-edge")
    cmd = [exe, "serve", str(bundle), "--host", "127.0.0.1", "--port", "0", "--runtime", "onnxruntime"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        url = _serve_url(proc)
        assert url.startswith("http://127.0.0.1:"), url
        body = json.dumps({"prompt": PROMPT, "seed": 5, "response_format": "b64_json"}).encode()
        req = urllib.request.Request(
            f"{url}/v1/images/generations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            data = json.loads(r.read())
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["data"][0]["b64_json"]))))
    finally:
        proc.send_signal(2)  # SIGINT: serve closes its sessions and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with runtimes.load(bundle, "onnxruntime") as s:
        want = to_uint8(s.generate_arrays(PROMPT, seed=5).image)[0]
    assert np.array_equal(got, want)
