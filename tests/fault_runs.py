"""The training commands that tests/test_faults.py kills with SIGKILL and runs again.

Each command is one resumable run into a folder, with the `tiny` models and the smoke recipes (six
optimizer steps per training stage, a checkpoint every two, a log line every step): run again on the same
folder it resumes. The tests start every run as a child of one multiprocessing fork server that has
imported this module and called `warm` (tests/fault_server.py), so a run costs its training, not a fresh
interpreter's imports.

`COMMANDS[name] = (run, {stage: its log file under the run folder})`, stages in the order they train.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from training.chain import run_chain, smoke_chain
from training.controlnet import get_config, run_controlnet
from training.lora import run_lora_chain, smoke_lora_chain
from training.teacher import smoke_config, train_teacher

STEPS = 6  # optimizer steps of every training stage below (smoke recipes: a checkpoint every 2)


def _teacher(out: Path) -> None:
    train_teacher(smoke_config(), out)


def _chain(out: Path) -> None:
    c = smoke_chain()
    six = {k: replace(getattr(c, k), steps=STEPS) for k in ("decoder", "unet_kd", "warmup", "ssd", "decoder_adapt")}
    cfg = replace(c, teacher="tiny-teacher", threads=1, cache_size=16, adapt_latents=8, **six)
    run_chain(cfg, out, until="onestep")


def _lora(out: Path) -> None:
    c = smoke_lora_chain("tiny-teacher", "tiny")
    cfg = replace(
        c,
        style_lora=replace(c.style_lora, steps=STEPS),
        distill=replace(c.distill, ssd=replace(c.distill.ssd, steps=STEPS)),
    )
    run_lora_chain(cfg, out, until="lora-distill")


def _controlnet(out: Path) -> None:
    c = get_config("smoke")
    cfg = replace(
        c, teacher_cn=replace(c.teacher_cn, steps=STEPS), student_cn=replace(c.student_cn, steps=STEPS), threads=1
    )
    run_controlnet(cfg, out, until="controlnet")


COMMANDS = {
    "teacher": (_teacher, {"vae": "vae/log.jsonl", "unet": "unet/log.jsonl"}),
    "chain": (
        _chain,
        {
            "decoder": "decoder/log.jsonl",
            "unet-kd": "unet-kd/log.jsonl",
            "warmup": "warmup/log.jsonl",
            "score-distill": "ssd/log.jsonl",
            "decoder-adapt": "decoder-adapt/log.jsonl",
        },
    ),
    "lora": (_lora, {"style-lora": "teacher-lora/log.jsonl", "lora-distill": "one-step-lora/log.jsonl"}),
    "controlnet": (
        _controlnet,
        {"teacher-controlnet": "teacher-controlnet/log.jsonl", "controlnet": "controlnet/log.jsonl"},
    ),
}

# Stages whose resumed results are held to their step count, their loss curve (equal to 1e-5) and weights
# equal to 1e-3 relative (one float16 step), not to their bits, with the weight files they leave. The
# ControlNets are not bitwise reproducible across process histories on CPU: after a resume the teacher
# ControlNet's weights differ from an uninterrupted run's in the last bit (about 1e-7) although every logged
# loss is equal, and the student ControlNet's loss differs in its last bits at some steps even before its own
# first checkpoint.
NOT_BITWISE = {
    "teacher-controlnet": ("teacher-controlnet/controlnet/", "export/shapes-teacher-controlnet-canny/"),
    "controlnet": ("controlnet/controlnet/", "export/shapes-controlnet-canny/"),
}


def warm() -> None:
    """Build the tiny models once on one thread, so that what the runs import lazily (transformers'
    quantizers, diffusers' model classes) is imported before the server forks."""
    import importlib

    from sdxs_edge.pipeline import SDXSPipeline

    for module in ("diffusers.models.controlnets", "diffusers.models.autoencoders", "peft.tuners.lora"):
        importlib.import_module(module)
    torch.set_num_threads(1)
    for preset in ("tiny-teacher", "tiny"):
        SDXSPipeline.load(preset)


def run(command: str, out: str, console: str) -> None:
    """One run of `command` into `out` (a forked child's target); its stdout and stderr are appended to
    `console`. Every run starts from the same torch state, as a fresh interpreter would."""
    f = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(f, 1)
    os.dup2(f, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    COMMANDS[command][0](Path(out))
