"""Faults injected into real runs: a full disk (RLIMIT_FSIZE in a child process) during a conversion, a
training checkpoint and an image write; `kill -9` at random points of each teacher training stage, then
resume; two conversions into one --out at once; temporaries a killed conversion left behind. In every
case: one clear error line, and the previous file, checkpoint or bundle intact."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from bundle_cache import cached_bundle, need

from sdxs_edge.bundle import load_manifest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sdxs_edge.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _file_limit(max_bytes: int):
    """preexec_fn: no file may grow past `max_bytes` (writes fail with EFBIG, as on a full disk)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


def _run(args: list[str], limit: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_file_limit(limit) if limit else None,
    )


def _error_line(r: subprocess.CompletedProcess) -> str:
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- a full disk ---------------------------------------------------------------------------------------
def test_full_disk_during_conversion_keeps_the_previous_bundle(tmp_path):
    need("onnxruntime")
    import shutil

    out = Path(shutil.copytree(cached_bundle("tiny", "onnx", "fp32"), tmp_path / "bundle"))
    before = _tree(out)
    r = _run(
        [*CLI, "convert", "tiny", "--target", "onnx", "--precision", "fp32", "--out", str(out), "--overwrite"],
        limit=256 << 10,
    )
    line = _error_line(r)
    assert (
        "could not write" in line
        and "the file size limit was reached; the previous version, if any, is unchanged" in line
    ), line
    assert _tree(out) == before and _leftovers(tmp_path) == []
    load_manifest(out)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    script = (
        "import sys, torch; from training.loop import Checkpointer\n"
        "m = torch.nn.Linear(512, 512); o = torch.optim.Adam(m.parameters())\n"
        "Checkpointer(sys.argv[1]).save(1, {'m': m}, {'o': o})\n"
    )
    first = _run([sys.executable, "-c", script, str(tmp_path)])
    assert first.returncode == 0, first.stderr[-2000:]
    ckpts = tmp_path / "checkpoints"
    before = _tree(ckpts)
    r = _run([sys.executable, "-c", script.replace("save(1", "save(2"), str(tmp_path)], limit=64 << 10)
    assert r.returncode != 0 and "WriteError: could not write" in r.stderr and "file size limit" in r.stderr, r.stderr[
        -2000:
    ]
    assert _tree(ckpts) == before and sorted(p.name for p in ckpts.iterdir()) == ["step-0000001"]


def test_full_disk_during_an_image_write_keeps_the_previous_image(tmp_path):
    from PIL import Image

    out = tmp_path / "img.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(out)  # the previous image (a few dozen bytes)
    before = out.read_bytes()
    r = _run(
        [*CLI, "generate", "a large blue square at the center on a black background", "--out", str(out)], limit=1024
    )
    line = _error_line(r)
    assert f"could not write {out}: the file size limit was reached" in line, line
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


# ---- kill -9, then resume ---------------------------------------------------------------------------------
TEACHER = (
    "import sys; from training.teacher import smoke_config, train_teacher; train_teacher(smoke_config(), sys.argv[1])"
)


def _lines(f: Path) -> int:
    return len(f.read_text().splitlines()) if f.is_file() else 0


def _kill_when(run: Path, log: str, at_line: int, timeout: float = 300) -> bool:
    """Start a teacher run and SIGKILL it once `run/log` has `at_line` lines; False if it ended first."""
    p = subprocess.Popen(
        [sys.executable, "-c", TEACHER, str(run)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        if _lines(run / log) >= at_line:
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.02)
    p.wait(timeout=timeout)
    return False


def test_kill_9_in_each_teacher_stage_then_resume_equals_an_uninterrupted_run(tmp_path):
    """The smoke teacher (VAE 6 steps, latent cache, U-Net 6 steps; a checkpoint every 2 steps), killed
    with SIGKILL at a random step of the VAE stage and again of the U-Net stage, then run to the end:
    its final weights equal, bit for bit, those of a run never interrupted (CPU, one thread)."""
    from safetensors.torch import load_file

    rng = random.Random(int(os.environ.get("SDXS_FAULT_SEED", "23")))
    whole = subprocess.Popen(
        [sys.executable, "-c", TEACHER, str(tmp_path / "whole")],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "killed"
    kills = [("vae/log.jsonl", rng.randint(1, 5)), ("unet/log.jsonl", rng.randint(1, 5))]
    for log, at in kills:
        assert _kill_when(run, log, at), f"the run finished before line {at} of {log}"
    resumed = subprocess.run(
        [sys.executable, "-c", TEACHER, str(run)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-2000:]
    # The resumed U-Net stage continued from its last checkpoint, not from step 0.
    unet_ckpt = (kills[1][1] // 2) * 2
    if unet_ckpt:
        assert "[unet] resuming from" in resumed.stdout and f"(step {unet_ckpt})" in resumed.stdout, resumed.stdout
    steps = [json.loads(l)["step"] for l in (run / "unet" / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and sorted(set(steps)) == list(range(1, 7))
    for comp in ("unet", "vae", "text_encoder"):
        a = load_file(
            str(
                tmp_path / "whole" / "model" / comp / "diffusion_pytorch_model.safetensors"
                if comp != "text_encoder"
                else tmp_path / "whole" / "model" / comp / "model.safetensors"
            )
        )
        b = load_file(
            str(
                run / "model" / comp / "diffusion_pytorch_model.safetensors"
                if comp != "text_encoder"
                else run / "model" / comp / "model.safetensors"
            )
        )
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), comp
    assert not [p for p in run.rglob(".*") if p.name.startswith((".step", ".model"))]


# ---- two conversions into one --out; what a killed one left ------------------------------------------------
def test_two_conversions_into_one_out_make_one_bundle_and_clean_stale_temporaries(tmp_path):
    need("onnxruntime")
    out = tmp_path / "bundle"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = [tmp_path / f".bundle.partial-{dead}-0", tmp_path / f".bundle.work-{dead}-1"]
    for d in stale:  # as a conversion killed with -9 leaves them
        d.mkdir()
        (d / "unet.onnx").write_bytes(b"half")
    cmd = [*CLI, "convert", "tiny", "--target", "onnx", "--precision", "fp32", "--out", str(out)]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    errors = [l for l in loser.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and (
        "is being written by another process" in errors[0] or "exists; pass --overwrite" in errors[0]
    ), loser[-2000:]
    load_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
