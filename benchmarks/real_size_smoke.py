"""The distillation chain at real size for a few steps per stage: throughput and peak GPU memory.

    python -m benchmarks.real_size_smoke --out runs/real-size-smoke --report models/reports/real-size-smoke

runs what `sdxs-edge train all --teacher sd21-base --prompts FILE --resolution 512 --recipe sd21-512
--smoke` runs (the SD-2.1-base layout with random weights as the teacher, the SDXS-512 student derived
from it, each stage's parallelism and precision from the `sd21-512` recipe), with `--steps` optimizer
steps per training stage at the smoke's batch sizes, a log line every step and a checkpoint only at the
end, so that the step times hold no checkpoint writes. It then reads each stage's log and writes
`REPORT.json` and `REPORT.md`: per stage, the median seconds per step after the first (which holds
cuDNN's algorithm search and the allocator's growth), images per second at that batch, the stage's
wall-clock seconds and its peak GPU memory (`torch.cuda.max_memory_allocated`, reset before each stage).

Made for one CUDA GPU; on CPU the same code runs (no memory figure), e.g. with `--teacher tiny-teacher`
at a small resolution, which is what the test suite does.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from dataclasses import replace
from pathlib import Path

from sdxs_edge.atomic import write_atomic

# Training stages: chain stage name -> (ChainConfig field, the stage's run folder under --out).
STAGES = {
    "decoder": ("decoder", "decoder"),
    "unet-kd": ("unet_kd", "unet-kd"),
    "warmup": ("warmup", "warmup"),
    "score-distill": ("ssd", "ssd"),
    "decoder-adapt": ("decoder_adapt", "decoder-adapt"),
}
PROMPTS = [
    "a red cube on a wooden table",
    "a lighthouse on a cliff at sunset, oil painting",
    "a bowl of ramen, studio photo",
    "a snowy mountain village at night",
    "a portrait of an old sailor, charcoal drawing",
    "a green parrot on a branch",
    "a futuristic city skyline in the rain",
    "a vase of sunflowers by a window",
]


def smoke_config(teacher: str, prompts: Path, resolution: int, steps: int, threads: int):
    """The CLI's `train all --teacher T --prompts F --resolution R --recipe sd21-512 --smoke` config,
    with `steps` per training stage, a log line every step and one checkpoint at the end; the report
    samples the multi-step models at one step and times each model's CPU latency once."""
    from sdxs_edge.cli import _chain_config, build_parser

    argv = ["train", "all", "--teacher", teacher, "--prompts", str(prompts), "--resolution", str(resolution)]
    cfg = _chain_config(build_parser().parse_args([*argv, "--recipe", "sd21-512", "--smoke"]))
    stages = {
        field: replace(getattr(cfg, field), steps=steps, log_every=1, ckpt_every=steps) for field, _ in STAGES.values()
    }
    return replace(cfg, **stages, eval_steps=1, latency_runs=1, threads=threads)


def step_seconds(log: Path) -> list[float]:
    """Seconds per optimizer step from a stage's log.jsonl (one record per step, cumulative `time`),
    the first step left out."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    times = [r["time"] for r in rows if "step" in r and "time" in r]
    return [b - a for a, b in zip(times, times[1:])]


def stage_rows(cfg, out: Path, report: dict) -> list[dict]:
    """Per training stage: batch, steps, median s/step, images/s, wall-clock s, peak GPU MiB."""
    rows = []
    for stage, (field, folder) in STAGES.items():
        sc = getattr(cfg, field)
        dts = step_seconds(out / folder / "log.jsonl")
        step_s = statistics.median(dts) if dts else None
        rows.append(
            {
                "stage": stage,
                "batch": sc.batch,
                "steps": sc.steps,
                "precision": sc.parallel.precision,
                "checkpointing": sc.parallel.checkpointing,
                "step_s": round(step_s, 4) if step_s else None,
                "images_per_s": round(sc.batch / step_s, 2) if step_s else None,
                "wall_s": report.get("stage_seconds", {}).get(stage),
                "peak_gpu_mib": report.get("peak_gpu_mib", {}).get(stage),
            }
        )
    return rows


def machine() -> dict:
    import torch

    m = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or "?"}
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
        m["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return m


def render(res: dict) -> str:
    lines = [
        f"# Real-size smoke of the distillation chain: {res['teacher']} at {res['resolution']}x{res['resolution']}",
        "",
        f"`{res['command']}` (steps per stage: {res['steps_per_stage']}), on {res['machine'].get('gpu', 'CPU')}, "
        f"torch {res['machine']['torch']}.",
        "",
        "| stage | batch | precision | grad. checkpointing | s/step (median, first left out) | images/s | stage wall s | peak GPU MiB |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:,}"  # noqa: E731
    for r in res["stages"]:
        lines.append(
            f"| {r['stage']} | {r['batch']} | {r['precision']} | {'yes' if r['checkpointing'] else 'no'} | "
            f"{fmt(r['step_s'])} | {fmt(r['images_per_s'])} | {fmt(r['wall_s'])} | {fmt(r['peak_gpu_mib'])} |"
        )
    other = {k: v for k, v in res["stage_seconds"].items() if k not in STAGES}
    peaks = res.get("peak_gpu_mib") or {}
    lines += [
        "",
        f"Teacher ODE pairs: {res['pairs']} pairs of {res['pair_steps']} steps with guidance in {res['pairs_seconds']} s "
        f"({res['pair_images_per_s']} pairs/s, built inside the decoder stage).",
        "Other stages (wall s, peak GPU MiB): "
        + ", ".join(f"{k} {v} s, {fmt(peaks.get(k))} MiB" for k, v in other.items())
        + ".",
        "",
        "The decoder and adaptation stages hold the teacher's KL decoder as the target; U-Net KD the teacher U-Net "
        "and the student; score distillation the student, the online DM and the frozen teacher. Stage wall "
        "seconds include model building, the final checkpoint and (for the report) the CPU latency of every model.",
        "",
    ]
    return "\n".join(lines)


def run(teacher: str, resolution: int, steps: int, out: Path, report: Path, threads: int) -> dict:
    from training.chain import run_chain

    out.mkdir(parents=True, exist_ok=True)
    prompts = out.parent / f"{out.name}-prompts.txt"
    write_atomic(prompts, "\n".join(PROMPTS) + "\n")
    cfg = smoke_config(teacher, prompts, resolution, steps, threads)
    rep = run_chain(cfg, out)
    pairs_s = rep.get("pairs_seconds")
    res = {
        "format": "sdxs-edge-real-size-smoke",
        "command": f"python -m benchmarks.real_size_smoke --teacher {teacher} --resolution {resolution} --steps {steps}",
        "teacher": teacher,
        "resolution": resolution,
        "steps_per_stage": steps,
        "machine": machine(),
        "stages": stage_rows(cfg, out, rep),
        "stage_seconds": rep.get("stage_seconds", {}),
        "peak_gpu_mib": rep.get("peak_gpu_mib"),
        "pairs": cfg.pairs,
        "pair_steps": cfg.pair_steps,
        "pairs_seconds": pairs_s,
        "pair_images_per_s": round(cfg.pairs / pairs_s, 2) if pairs_s else None,
        "unet_params": {k: m["unet_params"] for k, m in rep.get("models", {}).items()},
        "losses": rep.get("losses"),
    }
    report.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(report.with_suffix(".json"), json.dumps(res, indent=2))
    write_atomic(report.with_suffix(".md"), render(res))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--teacher", default="sd21-base", help="teacher preset or folder (default: sd21-base, random weights)"
    )
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per training stage")
    p.add_argument("--threads", type=int, default=16, help="CPU threads (the report's CPU latencies)")
    p.add_argument("--out", default="runs/real-size-smoke", help="the chain's run folder (must be new or this run's)")
    p.add_argument("--report", default="models/reports/real-size-smoke", help="REPORT.json and REPORT.md")
    a = p.parse_args(argv)
    res = run(a.teacher, a.resolution, a.steps, Path(a.out), Path(a.report), a.threads)
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
