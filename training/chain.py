"""The whole SDXS chain: teacher -> tiny decoder -> block-removed U-Net (KD) -> one-step (warm-up, then
segmented score distillation) -> report. Every stage resumes from its own folder under `out/`.

    sdxs-edge train all --preset shapes            # everything, reusing the committed teacher
    sdxs-edge train onestep --preset shapes        # the chain up to and including that stage
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from sdxs_edge.atomic import atomic_dir, atomic_file, write_atomic
from training.decoder import DecoderConfig, decoder_report, distill_decoder
from training.onestep import SSDConfig, WarmupConfig, ode_pair_chunks, score_distill, warmup
from training.teacher import TeacherConfig, build_latent_cache, smoke_config, train_teacher
from training.unet_kd import UNetKDConfig, build_student, distill_unet
from training.loop import StageClock

STAGES = ("teacher", "decoder", "unet-kd", "onestep", "all")
REPO = Path(__file__).resolve().parent.parent
COMMITTED_TEACHER = REPO / "models" / "shapes-teacher"


@dataclass(frozen=True)
class ChainConfig:
    """Args:
    student_preset: preset of the one-step student (its decoder layout and layer map).
    teacher: a trained teacher folder to reuse; None trains one with `teacher_cfg`.
    teacher_cfg: teacher recipe when none is reused.
    decoder, unet_kd, warmup, ssd: stage recipes.
    pairs: number of teacher ODE pairs (noise -> sample) for the one-step stages.
    pair_steps: teacher sampling steps for the pairs.
    eval_n: evaluation prompts per model in the report.
    eval_steps: steps for the multi-step models in the report.
    threads: torch CPU threads.
    cache_size: real images encoded for the decoder and U-Net KD.
    decoder_adapt: second decoder distillation on a pool with the one-step generator's latents (steps 0 = skip).
    adapt_latents: one-step latents (and as many real ones) in that pool.
    pair_chunk: teacher ODE pairs per resumable chunk.
    student_prediction_type: what the one-step U-Net predicts at t = 999. "v_prediction" (default): the
        output is about -x0, so the student's x0 is as well conditioned as its output; "epsilon" (the
        released SDXS checkpoints' rule) makes x0 = x - sigma * eps with sigma = 14.6, so every error of
        the predicted noise reaches x0 14.6 times larger, and a small student trained briefly stays far
        worse (on SHAPES-64: 0.48 all-correct for the epsilon student, 0.89 for the v student).
    """

    student_preset: str = "shapes"
    teacher: str | None = str(COMMITTED_TEACHER)
    teacher_cfg: TeacherConfig = field(default_factory=TeacherConfig)
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(steps=1000, gan_start=400))
    unet_kd: UNetKDConfig = field(default_factory=lambda: UNetKDConfig(steps=1200))
    warmup: WarmupConfig = field(default_factory=lambda: WarmupConfig(steps=1500, batch=64, lr=3e-4, loss="mse"))
    ssd: SSDConfig = field(default_factory=lambda: SSDConfig(steps=400, batch=64, guidance=2.5))
    pairs: int = 16384
    pair_steps: int = 25
    eval_n: int = 512
    eval_steps: int = 25
    threads: int = 2
    cache_size: int = 8192
    decoder_adapt: DecoderConfig = field(default_factory=lambda: DecoderConfig(steps=1200, lr=3e-4, gan_start=200))
    adapt_latents: int = 4096
    pair_chunk: int = 2048
    student_prediction_type: str = "v_prediction"


def gpu_chain() -> ChainConfig:
    """The recipe for one CUDA GPU: the same stages with about 10x the CPU recipe's samples.

    Each stage also has a wall-clock budget, so the chain fits a fixed lease of GPU time; a stage that
    spends its budget checkpoints, says so in its log and the chain moves on.
    """
    return ChainConfig(
        decoder=DecoderConfig(steps=20000, batch=128, gan_start=2000, gan_weight=0.05, max_seconds=90),
        unet_kd=UNetKDConfig(steps=20000, batch=256, max_seconds=95),
        warmup=WarmupConfig(steps=20000, batch=256, lr=2e-4, loss="mse", max_seconds=105),
        ssd=SSDConfig(steps=6000, batch=128, lr=3e-5, guidance=2.5, max_seconds=115),
        pairs=32768,
        cache_size=16384,
        threads=8,
    )


def smoke_chain() -> ChainConfig:
    """End to end in about a minute on tiny models (CI)."""
    return ChainConfig(
        student_preset="tiny",
        teacher=None,
        teacher_cfg=smoke_config(),
        decoder=DecoderConfig(steps=4, batch=4, gan_start=2),
        unet_kd=UNetKDConfig(steps=4, batch=4),
        warmup=WarmupConfig(steps=4, batch=4),
        ssd=SSDConfig(steps=4, batch=4),
        decoder_adapt=DecoderConfig(steps=4, batch=4, gan_start=2),
        adapt_latents=16,
        pairs=8,
        pair_steps=2,
        eval_n=8,
        eval_steps=2,
    )


def _save_unet_folder(unet, path: Path) -> None:
    with atomic_dir(path, overwrite=True) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)


def _latency(pipe, steps: int | None, guidance: float | None, runs: int = 5) -> float:
    """Median CPU seconds per image (a CPU copy when the pipeline lives on a GPU)."""
    if pipe.device.type != "cpu":
        import copy

        pipe = copy.deepcopy(pipe).to("cpu")
    prompt = "a large cyan triangle at the bottom left on a black background"
    pipe.generate(prompt, steps=steps, guidance=guidance)
    ts = []
    for i in range(runs):
        t = time.perf_counter()
        pipe.generate(prompt, seed=i, steps=steps, guidance=guidance)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def run_chain(cfg: ChainConfig, out: str | Path, until: str = "all") -> dict:
    """Run the chain up to stage `until`, resuming each stage; returns the report (for "all")."""
    from diffusers import DDPMScheduler

    from sdxs_edge import sampler, shapes
    from sdxs_edge.models import Components, build_vae, count_parameters
    from sdxs_edge.pipeline import SDXSPipeline
    from sdxs_edge.presets import get_preset

    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    from training import dist

    torch.set_num_threads(max(1, min(cfg.threads, os.cpu_count() or 1)))
    dev = dist.device()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(asdict(cfg), indent=2, default=str))
    clock = StageClock(out / "times.json")
    lap, times = clock.lap, clock.times

    # Teacher.
    teacher_dir = Path(cfg.teacher) if cfg.teacher else train_teacher(cfg.teacher_cfg, out / "teacher")
    teacher = SDXSPipeline.load(teacher_dir).to(dev)
    lap("teacher")
    if until == "teacher":
        return {"teacher": str(teacher_dir)}
    preset = get_preset(cfg.student_preset)
    sched_cfg = {k: v for k, v in teacher.c.scheduler_config.items() if not k.startswith("_")}
    acp = DDPMScheduler(**{k: v for k, v in sched_cfg.items() if k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type")}).alphas_cumprod
    empty = teacher.tokenize([""])[0]

    # Latent cache of real images (for the decoder and U-Net KD) and teacher ODE pairs (for the decoder
    # and the one-step stages): built on first use, so a chain whose stages are all done needs neither.
    data: dict[str, dict] = {}

    def cache() -> dict:
        if "cache" not in data:
            tcfg = replace(cfg.teacher_cfg, cache_size=cfg.cache_size)
            c = build_latent_cache(tcfg, teacher.c.vae, teacher.c.tokenizer, out / "latents.safetensors")
            data["cache"] = {**{k: v.to(dev) for k, v in c.items()}, "scaling_factor": torch.tensor(teacher.latent_scaling)}
        return data["cache"]

    pairs_file, held_file = out / "pairs.safetensors", out / "held-latents.safetensors"

    def pairs() -> dict:
        from safetensors.torch import load_file, save_file

        if "pairs" not in data:
            if pairs_file.is_file():  # a run from before the pairs were built in chunks
                p = load_file(str(pairs_file))
            else:
                p = ode_pair_chunks(teacher, out / "pairs", cfg.pairs, cfg.pair_steps, teacher.default_guidance, chunk=cfg.pair_chunk, batch=1024 if dev.type == "cuda" else 128)
            if not held_file.is_file():  # teacher samples held out for the decoder report
                with atomic_file(held_file) as tmp:
                    save_file({"x0": p["x0"][-256:].contiguous()}, str(tmp))
            data["pairs"] = {k: v.to(dev) for k, v in p.items()}
        return data["pairs"]

    # Tiny decoder.
    student_vae = build_vae(preset).to(dev)
    dec_done = out / "decoder" / "vae"
    if dec_done.is_dir():
        from diffusers import AutoencoderTiny

        student_vae = AutoencoderTiny.from_pretrained(dec_done, torch_dtype=torch.float32).to(dev)
    else:
        g = torch.Generator().manual_seed(0)
        c = cache()
        real = (c["mean"] + c["std"] * torch.randn(c["mean"].shape, generator=g).to(dev)) * teacher.latent_scaling
        pool = torch.cat([real, pairs()["x0"]])
        distill_decoder(cfg.decoder, out / "decoder", teacher.c.vae, student_vae, pool)
        student_vae.save_pretrained(dec_done, safe_serialization=True)
    if not held_file.is_file():
        pairs()
    from safetensors.torch import load_file

    held = load_file(str(held_file))["x0"].to(dev)
    report: dict = {"decoder": decoder_report(teacher.c.vae, student_vae, held)}
    lap("decoder")
    if until == "decoder":
        return report

    # Block-removed U-Net.
    kd_done = out / "unet-kd" / "unet"
    from diffusers import UNet2DConditionModel

    if kd_done.is_dir():
        kd_unet = UNet2DConditionModel.from_pretrained(kd_done, torch_dtype=torch.float32).to(dev)
    else:
        kd_unet, init = build_student(teacher.c.unet, preset.layer_map)
        kd_unet.to(dev)
        (out / "unet-kd").mkdir(parents=True, exist_ok=True)
        write_atomic(out / "unet-kd" / "init.json", json.dumps(init, indent=2))
        distill_unet(cfg.unet_kd, out / "unet-kd", teacher.c.unet, teacher.c.text_encoder, kd_unet, cache(), empty, acp)
        _save_unet_folder(kd_unet, kd_done)
    lap("unet-kd")
    if until == "unet-kd":
        return report

    # One-step: warm-up then segmented score distillation.
    student_sched = {**sched_cfg, "prediction_type": cfg.student_prediction_type}

    def one_step_pipe(unet, vae, name: str) -> SDXSPipeline:
        p = SDXSPipeline(Components(teacher.c.tokenizer, teacher.c.text_encoder, unet, vae, dict(student_sched)), name=name)
        p.default_steps, p.default_guidance = 1, 0.0
        return p

    consts = sampler.one_step_constants(student_sched, teacher.latent_scaling)
    warm_done = out / "model-warmup"
    if warm_done.is_dir():
        warm = SDXSPipeline.load(warm_done).to(dev)
    else:
        import copy

        student = copy.deepcopy(kd_unet)
        warmup(cfg.warmup, out / "warmup", student, teacher.c.text_encoder, teacher.c.unet, pairs(), consts)
        warm = one_step_pipe(student, student_vae, "shapes one-step (warm-up only)")
        warm.save_pretrained(warm_done)
    lap("warmup")
    ssd_done = out / "model-ssd"
    if ssd_done.is_dir():
        final = SDXSPipeline.load(ssd_done).to(dev)
    else:
        import copy

        student = copy.deepcopy(warm.c.unet)
        score_distill(cfg.ssd, out / "ssd", student, teacher.c.text_encoder, teacher.c.unet, pairs(), consts, acp, empty)
        final = one_step_pipe(student, student_vae, "sdxs-shapes one-step")
        final.save_pretrained(ssd_done)
    lap("score-distill")

    # Decoder adaptation: the tiny decoder was distilled on latents of real images and teacher samples;
    # the one-step generator's latents sit slightly off that manifold, where a 36k-parameter decoder
    # errs far more than the teacher's. A short second distillation on a pool that adds the
    # generator's own latents (teacher decoder as the target, same loss) closes that gap.
    final_done = out / "model"
    if final_done.is_dir():
        final = SDXSPipeline.load(final_done).to(dev)
    elif cfg.decoder_adapt.steps > 0:
        import copy

        from safetensors.torch import load_file

        c = cache()
        g = torch.Generator().manual_seed(1)
        n = min(len(c["mean"]), cfg.adapt_latents)
        real = (c["mean"][:n] + c["std"][:n] * torch.randn(c["mean"][:n].shape, generator=g).to(dev)) * teacher.latent_scaling
        caps = [s.caption for s in shapes.eval_scenes(cfg.adapt_latents, seed=4243)]  # not an eval seed
        gen = []
        for i in range(0, len(caps), 256):
            gen.append(final.generate(caps[i : i + 256], seed=50_000 + i, output="tensor").latents)
        pool = torch.cat([real, torch.cat(gen), load_file(str(held_file))["x0"].to(dev)])
        adapted = copy.deepcopy(final.c.vae)
        distill_decoder(cfg.decoder_adapt, out / "decoder-adapt", teacher.c.vae, adapted, pool)
        final = one_step_pipe(final.c.unet, adapted, "sdxs-shapes one-step")
        final.save_pretrained(final_done)
    else:
        final.save_pretrained(final_done)
    report["decoder_adapted"] = decoder_report(teacher.c.vae, final.c.vae, held)
    lap("decoder-adapt")
    if until == "onestep":
        return report

    # Report.
    from sdxs_edge.evaluate import EvalSettings, Evaluator, evaluate_pipeline, save_grid

    ev = Evaluator.load()
    kd_pipe = SDXSPipeline(Components(teacher.c.tokenizer, teacher.c.text_encoder, kd_unet, teacher.c.vae, dict(sched_cfg)), name="block-removed student")
    rows = [
        ("teacher", teacher, cfg.eval_steps, teacher.default_guidance),
        ("block-removed (KD)", kd_pipe, cfg.eval_steps, teacher.default_guidance),
        ("one-step, warm-up only", warm, 1, 0.0),
        ("one-step, score distillation", final, 1, 0.0),
    ]
    report["models"] = {}
    for name, pipe, steps, guidance in rows:
        rep, images = evaluate_pipeline(pipe, EvalSettings(n=cfg.eval_n, steps=steps, guidance=guidance), ev)
        slug = name.split(",")[0].replace(" ", "-").replace("(", "").replace(")", "") + ("-ssd" if "score" in name else "")
        save_grid(images, out / f"grid-{slug}.png")
        rep["unet_params"] = count_parameters(pipe.c.unet)
        rep["decoder_params"] = count_parameters(pipe.c.vae.decoder)
        rep["cpu_latency_s"] = _latency(pipe, steps, guidance)
        report["models"][name] = rep
    lap("report")
    report["stage_seconds"] = times
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    write_atomic(out / "report.md", format_chain_report(report))
    return report


def format_chain_report(report: dict) -> str:
    d = report["decoder"]
    lines = [
        "# SDXS chain on SHAPES-64",
        "",
        "| model | steps | all-correct | size | color | shape | position | background | FID-shapes | U-Net params | CPU s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["models"].items():
        lines.append(
            f"| {name} | {r['steps']} | {r['all_correct']:.3f} | {r['size']:.3f} | {r['color']:.3f} | {r['shape']:.3f} | {r['position']:.3f} | {r['background']:.3f} | {r['fid_shapes']:.2f} | {r['unet_params']:,} | {r['cpu_latency_s']:.3f} |"
        )
    lines += [
        "",
        f"Tiny decoder: PSNR {d['psnr_vs_teacher']:.2f} dB and SSIM {d['ssim_vs_teacher']:.3f} against the teacher's decoder; "
        f"{d['student_params']:,} vs {d['teacher_params']:,} parameters ({d['param_ratio']:.1f}x fewer), {d['cpu_speed_ratio']:.1f}x faster on CPU.",
        *(
            [
                f"Tiny decoder after adaptation to the one-step generator's latents: PSNR {report['decoder_adapted']['psnr_vs_teacher']:.2f} dB, "
                f"SSIM {report['decoder_adapted']['ssim_vs_teacher']:.3f} on the same teacher samples.",
            ]
            if "decoder_adapted" in report
            else []
        ),
        "",
        "Stage wall-clock seconds: " + ", ".join(f"{k} {v}" for k, v in report.get("stage_seconds", {}).items()),
        "",
    ]
    return "\n".join(lines)
