"""One-step warm-up ablation on SHAPES-64: loss (MSE or SSIM features) and prediction type, optionally
followed by segmented score distillation, from the chain's block-removed U-Net and teacher ODE pairs.

    python -m training.warmup_ablation RUN --loss mse --steps 1500            # RUN: a chain run folder
    python -m training.warmup_ablation RUN --loss ssim --steps 1500
    python -m training.warmup_ablation RUN --steps 0 --ssd 300 --from OUT/unet  # SSD on a warmed-up student

Prints one JSON line per run (512 evaluation prompts, one step, no guidance) and saves the U-Net.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from diffusers import UNet2DConditionModel

    from sdxs_edge import sampler
    from sdxs_edge.evaluate import EvalSettings, evaluate_pipeline
    from sdxs_edge.models import Components
    from sdxs_edge.pipeline import SDXSPipeline
    from training.chain import COMMITTED_TEACHER
    from training.onestep import SSDConfig, WarmupConfig, ode_pair_chunks, score_distill, warmup

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="chain run folder (its unet-kd/unet, pairs/ chunks and model/ decoder)")
    ap.add_argument("--out", type=Path, help="output folder (default: RUN/ablation-NAME)")
    ap.add_argument("--loss", choices=["mse", "ssim"], default="mse")
    ap.add_argument("--prediction-type", choices=["v_prediction", "epsilon"], default="v_prediction")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ssd", type=int, default=0, help="score-distillation steps after the warm-up")
    ap.add_argument("--from", dest="src", type=Path, help="start from this U-Net folder instead of RUN/unet-kd/unet")
    ap.add_argument("--decoder", type=Path, help="tiny decoder folder for the evaluation (default: RUN/model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=512)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    name = f"{a.loss}-{a.prediction_type}-w{a.steps}-s{a.ssd}"
    out = a.out or a.run / f"ablation-{name}"
    config = a.run / "config.json"  # the chain's resolved config: which teacher and pairs the run used
    if not config.is_file() or not any((a.run / "pairs").glob("chunk-*.safetensors")):
        raise SystemExit(
            f"error: {a.run} holds no chain config or teacher ODE pairs (run `sdxs-edge train onestep --out {a.run}` first)"
        )
    cfg = json.loads(config.read_text())
    teacher = SDXSPipeline.load(cfg.get("teacher") or COMMITTED_TEACHER)
    decoder = SDXSPipeline.load(a.decoder or a.run / "model").c.vae
    pairs = ode_pair_chunks(
        teacher,
        a.run / "pairs",
        cfg["pairs"],
        cfg["pair_steps"],
        teacher.default_guidance,
        chunk=cfg.get("pair_chunk", 2048),
    )
    sched = {k: v for k, v in teacher.c.scheduler_config.items() if not k.startswith("_")}
    sched["prediction_type"] = a.prediction_type
    consts = sampler.one_step_constants(sched, teacher.latent_scaling)
    student = UNet2DConditionModel.from_pretrained(a.src or a.run / "unet-kd" / "unet", torch_dtype=torch.float32)
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
            SSDConfig(steps=a.ssd, batch=a.batch, guidance=2.5),
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
    student.eval().save_pretrained(out / "unet", safe_serialization=True)
    pipe = SDXSPipeline(Components(teacher.c.tokenizer, teacher.c.text_encoder, student, decoder, sched), name=name)
    pipe.default_steps, pipe.default_guidance = 1, 0.0
    rep, _ = evaluate_pipeline(pipe, EvalSettings(n=a.n), progress=False)
    keep = ("all_correct", "size", "color", "shape", "position", "background", "fid_shapes")
    print(json.dumps({"run": name, "train_seconds": round(seconds, 1), **{k: round(rep[k], 4) for k in keep}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
