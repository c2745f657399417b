"""Faults injected into real runs: a full disk (RLIMIT_FSIZE in a child process) during a conversion, a
training checkpoint and an image write; `kill -9` at a random step of every training stage, then resume
(bitwise equal to an uninterrupted run); two conversions into one --out at once; temporaries a killed
conversion left behind. In every case: one clear error line, and the previous file, checkpoint or bundle
intact."""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import fault_runs
import pytest
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
_SERVER: list = []


def _fork_server():
    """A multiprocessing context whose children fork from one process that has imported the training code."""
    import multiprocessing

    if not _SERVER:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["fault_server"])
        _SERVER.append(ctx)
    return _SERVER[0]


def _records(log: Path) -> list[dict]:
    """A stage's JSONL log: step and losses (not the stage name, the log file's, nor the wall-clock time)."""
    lines = log.read_text().splitlines() if log.is_file() else []
    return [{k: v for k, v in json.loads(l).items() if k not in ("stage", "time")} for l in lines]


def _start(command: str, run: Path):
    p = _fork_server().Process(target=fault_runs.run, args=(command, str(run), f"{run}.console"))
    p.start()
    return p


def _kill_when(command: str, run: Path, log: str, at_line: int, timeout: float = 300) -> bool:
    """Run `command` into `run` and SIGKILL it once `run/log` has `at_line` lines; False if it ended first."""
    p = _start(command, run)
    t0 = time.time()
    while p.is_alive() and time.time() - t0 < timeout:
        if len(_records(run / log)) >= at_line:
            p.kill()
            p.join()
            return p.exitcode == -signal.SIGKILL
        time.sleep(0.02)
    p.join(timeout)
    return False


def _weights(run: Path) -> dict[str, dict]:
    """Every safetensors file a run leaves outside its checkpoints, loaded."""
    from safetensors.torch import load_file

    files = (p for p in run.rglob("*.safetensors") if "checkpoints" not in p.relative_to(run).parts)
    return {str(p.relative_to(run)): load_file(str(p)) for p in sorted(files)}


def _resumed_from(console: Path) -> dict[str, list[int]]:
    """Stage folder -> the steps its loop resumed from, in order, read from the runs' console output."""
    seen: dict[str, list[int]] = {}
    for m in re.finditer(r"resuming from (\S+)/checkpoints/step-\d+ \(step (\d+)\)", console.read_text()):
        seen.setdefault(Path(m.group(1)).name, []).append(int(m.group(2)))
    return seen


TEMPORARY = re.compile(r"^\..+\.(partial|work|old|tmp)-\d+(-\d+)?$")


@pytest.mark.heavy
@pytest.mark.parametrize("command", list(fault_runs.COMMANDS))
def test_kill_9_in_each_training_stage_then_resume_equals_an_uninterrupted_run(command, tmp_path):
    """Each training command (teacher: VAE, U-Net; chain: tiny decoder, U-Net KD, one-step warm-up, score
    distillation, decoder adaptation; LoRA: teacher style LoRA, one-step LoRA distillation; ControlNet:
    teacher and student ControlNets), six steps per stage with a checkpoint every two, is killed with SIGKILL
    at a random step of every one of its stages after its first checkpoint, and run again after each kill.
    Each resumed stage continues from its last checkpoint (not from step 0) to the last step. Bitwise (CPU,
    one thread): every stage but the two ControlNets - its loss curve (every logged value, the steps run twice
    included) and every weight file it leaves equal the uninterrupted run's bit for bit. Not bitwise: the
    teacher and student ControlNets (`fault_runs.NOT_BITWISE`) - their loss curves equal the uninterrupted
    run's to 1e-5 and their weights to 1e-3 relative (one float16 step). No temporary is left behind."""
    _, stages = fault_runs.COMMANDS[command]
    steps = fault_runs.STEPS
    rng = random.Random(f"{os.environ.get('SDXS_FAULT_SEED', '23')}-{command}")
    whole, run = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = _start(command, whole)
    kills = {stage: rng.randint(3, steps - 1) for stage in stages}  # line 3 and later: step 2 is checkpointed
    for stage, at in kills.items():
        assert _kill_when(command, run, stages[stage], at), f"{command}: the run ended before line {at} of {stage}"
    resumed = _start(command, run)
    resumed.join(600)
    console = Path(f"{run}.console")
    assert resumed.exitcode == 0, console.read_text()[-3000:]
    uninterrupted.join(600)
    assert uninterrupted.exitcode == 0, Path(f"{whole}.console").read_text()[-3000:]

    resumes = _resumed_from(console)
    for stage, log in stages.items():
        folder = Path(log).parent.name
        first, *later = resumes.get(folder, [0])
        assert 2 <= first <= kills[stage] and first % 2 == 0, (stage, kills[stage], resumes)
        assert all(s == steps for s in later), (stage, resumes)
        expected = {r["step"]: r for r in _records(whole / log)}
        got = _records(run / log)
        assert sorted(expected) == list(range(1, steps + 1)), (stage, sorted(expected))
        assert {r["step"] for r in got} == set(expected), (stage, got)
        for r in got:
            want = expected[r["step"]]
            assert r == (want if stage not in fault_runs.NOT_BITWISE else pytest.approx(want, rel=1e-5)), (stage, r)
    a, b = _weights(whole), _weights(run)
    assert a.keys() == b.keys() and a, sorted(set(a) ^ set(b))
    approximate = tuple(p for prefixes in fault_runs.NOT_BITWISE.values() for p in prefixes)
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        if name.startswith(approximate):
            assert all(b[name][k].float().allclose(a[name][k].float(), rtol=1e-3, atol=1e-5) for k in a[name]), name
        else:
            assert all(a[name][k].equal(b[name][k]) for k in a[name]), name
    assert not [str(p) for p in run.rglob(".*") if TEMPORARY.match(p.name)]


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
