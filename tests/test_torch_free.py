"""The deployment path imports no PyTorch: the CLI's parser, `run` on an ONNX bundle, the self-check
(`parity --reference none`) and the server (app and entries, with its warm-up generation) work in a
process where importing torch, diffusers, transformers, safetensors or executorch fails, as in a
`pip install 'sdxs-edge[onnxruntime,serve]'` venv.

Cheap (seconds): the blocking import hook stands in for the missing packages; tests/test_deploy.py (slow)
checks the same in a real torch-free virtualenv built from the wheel.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bundle_cache import cached_bundle, need

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "diffusers", "transformers", "safetensors", "executorch")

# Runs first in a child process: every import of a blocked package raises ImportError, as in a torch-free venv.
BLOCK = """
import importlib.abc, pathlib, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked (torch-free deployment)")
sys.meta_path.insert(0, Block())
bundle = pathlib.Path(sys.argv[1])
"""

PROBE = (
    BLOCK
    + """
from sdxs_edge.cli import build_parser
args = build_parser().parse_args(["run", str(bundle), "a red circle", "--runtime", "onnxruntime", "--out", sys.argv[2]])
assert args.func(args) == 0
from server.app import Limits, Server, create_app
from server.models import load_entries
entries = load_entries([bundle], None, lambda line: None)
create_app(Server(entries, Limits(max_queue=2, timeout_s=10.0), None))
print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""
)

# `parity --reference none` through the CLI's entry point (its exit code), then the modules loaded.
SELFCHECK_PROBE = (
    BLOCK
    + """
from sdxs_edge.cli import main
rc = main(["parity", str(bundle), "--runtime", "onnxruntime", "--reference", "none"])
print(rc, sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""
)


def test_run_and_server_import_no_torch(tmp_path):
    need("onnxruntime")
    need("fastapi")
    bundle = cached_bundle("tiny", "onnx", "fp32")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(blocked=BLOCKED), str(bundle), str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert (tmp_path / "x.png").stat().st_size > 0


def test_selfcheck_imports_no_torch():
    """`parity --reference none` on the shipped model's ONNX bundle passes with PyTorch unimportable."""
    need("onnxruntime")
    bundle = cached_bundle("default", "onnx", "fp32")
    proc = subprocess.run(
        [sys.executable, "-c", SELFCHECK_PROBE.format(blocked=BLOCKED), str(bundle)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASSED" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout + proc.stderr
