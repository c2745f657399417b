"""One-step warm-up ablation on SHAPES-64: loss (MSE or SSIM features) and prediction type, optionally
followed by segmented score distillation, from the chain's block-removed U-Net and teacher ODE pairs.

    python -m training.warmup_ablation RUN --loss mse --steps 1500            # RUN: a chain run folder
    python -m training.warmup_ablation RUN --loss ssim --steps 1500
    python -m training.warmup_ablation RUN --steps 0 --ssd 300 --from OUT/unet  # SSD on a warmed-up student
    python -m training.warmup_ablation RUN --steps 0 --ssd 400 --from RUN/unet-kd/unet  # SSD without warm-up

Missing teacher ODE pairs are built first (RUN/config.json names the teacher and how many); `--device
cuda` runs them, the warm-up and the score distillation on a GPU (`--kd` and the evaluation stay on the
CPU). A run resumes from OUT/ssd/checkpoints; `python -m training.ssd_curve OUT/ssd` scores those
checkpoints.

Prints one JSON line per run (512 evaluation prompts, one step, no guidance) and saves the U-Net.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="chain run folder (its unet-kd/unet, pairs/ chunks and model/ decoder)")
    ap.add_argument("--out", type=Path, help="output folder (default: RUN/ablation-NAME)")
    ap.add_argument("--loss", choices=["mse", "ssim"], default="mse")
    ap.add_argument("--prediction-type", choices=["v_prediction", "epsilon"], default="v_prediction")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ssd", type=int, default=0, help="score-distillation steps after the warm-up")
    ap.add_argument("--ssd-lr", type=float, default=2e-5, help="score distillation: student learning rate")
    ap.add_argument("--alpha", type=float, nargs=2, default=(0.95, 0.7), metavar=("START", "END"))
    ap.add_argument("--fm", type=float, nargs=2, default=(10.0, 1.0), metavar=("START", "END"), help="lambda_FM")
    ap.add_argument("--fresh-noise", action="store_true", help="score distillation: fresh input noise (SSDConfig)")
    ap.add_argument("--max-seconds", type=float, help="score distillation: wall-clock budget (schedule included)")
    ap.add_argument("--ckpt-every", type=int, default=200, help="score distillation: steps between checkpoints")
    ap.add_argument("--from", dest="src", type=Path, help="start from this U-Net folder instead of RUN/unet-kd/unet")
    ap.add_argument(
        "--kd",
        type=int,
        nargs=2,
        metavar=("STEPS", "SECONDS"),
        help="first build RUN/unet-kd/unet when it is missing: block removal + U-Net KD (the chain's CPU recipe, batch 64), this many steps within this wall-clock budget",
    )
    ap.add_argument("--decoder", type=Path, help="tiny decoder folder for the evaluation (default: RUN/model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device of the pairs, warm-up and score distillation")
    ap.add_argument("--n", type=int, default=512)
    return ap


def kd_student(run: Path, teacher, steps: int, seconds: float) -> Path:
    """The chain's block-removed U-Net stage into RUN/unet-kd (resumable; skipped when it is done):
    block removal of the teacher through the shapes layer map, then output + feature KD on encoded
    SHAPES-64 renders (8,192, the CPU recipe's cache)."""
    from dataclasses import replace

    from sdxs_edge import sampler
    from sdxs_edge.presets import get_preset
    from training.chain import ChainConfig, _save_model_folder
    from training.teacher import build_latent_cache
    from training.unet_kd import UNetKDConfig, build_student, distill_unet

    done, c = run / "unet-kd" / "unet", ChainConfig()
    if done.is_dir():
        return done
    tcfg = replace(c.teacher_cfg, cache_size=c.cache_size)
    cache = build_latent_cache(tcfg, teacher.c.vae, teacher.c.tokenizer, run / "latents.safetensors")
    cache = {**cache, "scaling_factor": torch.tensor(teacher.latent_scaling)}
    student, _ = build_student(teacher.c.unet, get_preset(c.student_preset).layer_map)
    acp = torch.from_numpy(sampler.alphas_cumprod(teacher.c.scheduler_config))
    cfg = UNetKDConfig(steps=steps, batch=64, max_seconds=seconds, ckpt_every=100)
    t = teacher.c
    student = distill_unet(cfg, run / "unet-kd", t.unet, t.text_encoder, student, cache, teacher.tokenize([""])[0], acp)
    _save_model_folder(student, done)
    return done


def _ssd_config(a: argparse.Namespace):
    """The score-distillation stage as the command line sets it (guidance 2.5, the teacher's best)."""
    from training.onestep import SSDConfig

    return SSDConfig(
        steps=a.ssd,
        batch=a.batch,
        lr=a.ssd_lr,
        guidance=2.5,
        alpha_start=a.alpha[0],
        alpha_end=a.alpha[1],
        fm_start=a.fm[0],
        fm_end=a.fm[1],
        fresh_noise=a.fresh_noise,
        ckpt_every=a.ckpt_every,
        max_seconds=a.max_seconds,
    )


def main(argv: list[str] | None = None) -> int:
    from diffusers import UNet2DConditionModel

    from sdxs_edge import sampler
    from sdxs_edge.evaluate import EvalSettings, evaluate_pipeline
    from sdxs_edge.models import Components
    from sdxs_edge.pipeline import SDXSPipeline
    from training.chain import COMMITTED_TEACHER
    from training.onestep import WarmupConfig, ode_pair_chunks, score_distill, warmup

    a = _parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    name = f"{a.loss}-{a.prediction_type}-w{a.steps}-s{a.ssd}"
    out = a.out or a.run / f"ablation-{name}"
    config = a.run / "config.json"  # the chain's resolved config: which teacher and pairs the run used
    if a.kd and a.device != "cpu":
        raise SystemExit("error: --kd runs on the CPU only; leave out --device or --kd")
    if not config.is_file():
        raise SystemExit(f"error: {a.run} holds no chain config (run `sdxs-edge train onestep --out {a.run}` first)")
    cfg = json.loads(config.read_text())
    dev = torch.device(a.device)
    teacher = SDXSPipeline.load(cfg.get("teacher") or COMMITTED_TEACHER).to(dev)
    decoder = SDXSPipeline.load(a.decoder or a.run / "model").c.vae
    pairs = ode_pair_chunks(
        teacher,
        a.run / "pairs",
        cfg["pairs"],
        cfg["pair_steps"],
        teacher.default_guidance,
        chunk=cfg.get("pair_chunk", 2048),
    )
    pairs = {k: v.to(dev) for k, v in pairs.items()}
    sched = {k: v for k, v in teacher.c.scheduler_config.items() if not k.startswith("_")}
    sched["prediction_type"] = a.prediction_type
    consts = sampler.one_step_constants(sched, teacher.latent_scaling)
    if a.kd and not a.src:
        kd_student(a.run, teacher, *a.kd)
    src = a.src or a.run / "unet-kd" / "unet"
    student = UNet2DConditionModel.from_pretrained(src, torch_dtype=torch.float32).to(dev)
    t0 = time.perf_counter()
    if a.steps:
        warmup(
            WarmupConfig(steps=a.steps, batch=a.batch, lr=a.lr, loss=a.loss),
            out / "warmup",
            student,
            teacher.c.text_encoder,
            teacher.c.unet,
            pairs,
            consts,
        )
    if a.ssd:
        acp = torch.from_numpy(sampler.alphas_cumprod(teacher.c.scheduler_config))
        score_distill(
            _ssd_config(a),
            out / "ssd",
            student,
            teacher.c.text_encoder,
            teacher.c.unet,
            pairs,
            consts,
            acp,
            teacher.tokenize([""])[0],
        )
    seconds = time.perf_counter() - t0
    student, teacher = student.cpu(), teacher.to("cpu")  # the evaluation runs on the CPU
    student.eval().save_pretrained(out / "unet", safe_serialization=True)
    pipe = SDXSPipeline(Components(teacher.c.tokenizer, teacher.c.text_encoder, student, decoder, sched), name=name)
    pipe.default_steps, pipe.default_guidance = 1, 0.0
    rep, _ = evaluate_pipeline(pipe, EvalSettings(n=a.n), progress=False)
    keep = ("all_correct", "size", "color", "shape", "position", "background", "fid_shapes")
    print(json.dumps({"run": name, "train_seconds": round(seconds, 1), **{k: round(rep[k], 4) for k in keep}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
