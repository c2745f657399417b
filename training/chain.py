"""The whole SDXS chain: teacher -> tiny decoder -> block-removed U-Net (KD) -> one-step (warm-up, then
segmented score distillation) -> report. Every stage resumes from its own folder under `out/`.

    sdxs-edge train all --preset shapes            # everything, reusing the committed teacher
    sdxs-edge train onestep --preset shapes        # the chain up to and including that stage
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sdxs_edge.atomic import atomic_dir, atomic_file, write_atomic
from training.decoder import DecoderConfig, decoder_report, distill_decoder
from training.generic import format_generic_report
from training.loop import StageClock
from training.onestep import SSDConfig, WarmupConfig, ode_pair_chunks, score_distill, warmup
from training.teacher import TeacherConfig, build_latent_cache, smoke_config, train_teacher
from training.unet_kd import UNetKDConfig, build_student, distill_unet

STAGES = ("teacher", "decoder", "unet-kd", "onestep", "all")
REPO = Path(__file__).resolve().parent.parent
COMMITTED_TEACHER = REPO / "models" / "shapes-teacher"


@dataclass(frozen=True)
class ChainConfig:
    """Args:
    student_preset: preset of the one-step student (its decoder layout and layer map); with `prompts`, None
        derives it from the teacher (`training.generic.student_preset`).
    teacher: a trained teacher folder to reuse (with `prompts`: any SD-1.x / 2.x folder or a preset); None
        trains one with `teacher_cfg`.
    prompts: a prompt file: the generic chain (any teacher; pairs, decoder adaptation and the report use
        these prompts instead of SHAPES-64 captions). None: the SHAPES-64 chain.
    images: with `prompts`, an imagefolder (metadata.jsonl) for the decoder and U-Net KD; None: the
        teacher's own samples.
    resolution: with `prompts`, the image side to distil at (default: the teacher's).
    teacher_cfg: teacher recipe when none is reused.
    decoder, unet_kd, warmup, ssd: stage recipes.
    pairs: number of teacher ODE pairs (noise -> sample) for the one-step stages.
    pair_steps: teacher sampling steps for the pairs.
    eval_n: evaluation prompts per model in the report.
    eval_steps: steps for the multi-step models in the report.
    latency_runs: timed runs per model for the report's CPU seconds per image (median).
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
    latency_runs: int = 5
    threads: int = 2
    cache_size: int = 8192
    decoder_adapt: DecoderConfig = field(default_factory=lambda: DecoderConfig(steps=1200, lr=3e-4, gan_start=200))
    adapt_latents: int = 4096
    pair_chunk: int = 2048
    student_prediction_type: str = "v_prediction"
    prompts: str | None = None
    images: str | None = None
    resolution: int | None = None


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
        decoder=DecoderConfig(steps=4, batch=4, gan_start=2, ckpt_every=2, log_every=1),
        unet_kd=UNetKDConfig(steps=4, batch=4, ckpt_every=2, log_every=1),
        warmup=WarmupConfig(steps=4, batch=4, ckpt_every=2, log_every=1),
        ssd=SSDConfig(steps=4, batch=4, ckpt_every=2, log_every=1),
        decoder_adapt=DecoderConfig(steps=4, batch=4, gan_start=2, ckpt_every=2, log_every=1),
        adapt_latents=16,
        pairs=8,
        pair_steps=2,
        eval_n=8,
        eval_steps=2,
    )


def _save_model_folder(model, path: Path) -> None:
    """A diffusers model folder, written whole or not at all (a kill mid-write leaves no half folder that a
    resumed run would take for a finished stage)."""
    with atomic_dir(path, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)


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


@dataclass
class _Run:
    """What the stages of one chain run share: the settings, the teacher, the data built on first use,
    the models each stage leaves for the next, and the report."""

    cfg: ChainConfig
    out: Path
    dev: torch.device
    d: Any = None  # training.dist.DistInfo
    teacher: Any = None
    teacher_dir: Path | None = None
    preset: Any = None
    sched_cfg: dict = field(default_factory=dict)
    acp: Any = None
    empty: Any = None
    data: dict = field(default_factory=dict)
    student_vae: Any = None
    held: Any = None
    kd_unet: Any = None
    warm: Any = None
    final: Any = None
    report: dict = field(default_factory=dict)
    prompts: list[str] | None = None

    @property
    def pairs_file(self) -> Path:
        return self.out / "pairs.safetensors"

    @property
    def held_file(self) -> Path:
        return self.out / "held-latents.safetensors"

    def cache(self) -> dict:
        """Latent cache of real images (decoder and U-Net KD), built on first use."""
        if "cache" not in self.data:
            c = self._generic_cache() if self.prompts else None
            if c is None:
                tcfg = replace(self.cfg.teacher_cfg, cache_size=self.cfg.cache_size)
                c = self.d.main_first(
                    lambda: build_latent_cache(
                        tcfg, self.teacher.c.vae, self.teacher.c.tokenizer, self.out / "latents.safetensors"
                    )
                )
            scaling = torch.tensor(self.teacher.latent_scaling)
            self.data["cache"] = {**{k: v.to(self.dev) for k, v in c.items()}, "scaling_factor": scaling}
        return self.data["cache"]

    def _generic_cache(self) -> dict:
        from training.generic import image_cache, sample_cache

        if self.cfg.images:
            return self.d.main_first(
                lambda: image_cache(
                    self.cfg.images,
                    self.teacher.resolution,
                    self.teacher.c.vae,
                    self.teacher.c.tokenizer,
                    self.out / "latents.safetensors",
                )
            )
        return sample_cache({k: v.cpu() for k, v in self.pairs().items()}, self.teacher.latent_scaling)

    def pairs(self) -> dict:
        """Teacher ODE pairs (decoder and one-step stages), built on first use, in resumable chunks."""
        from safetensors.torch import load_file, save_file

        if "pairs" not in self.data:
            cfg = self.cfg
            if self.pairs_file.is_file():  # a run from before the pairs were built in chunks
                p = load_file(str(self.pairs_file))
            else:
                batch = 1024 if self.dev.type == "cuda" else 128
                guidance = self.teacher.default_guidance
                t = time.perf_counter()
                p = ode_pair_chunks(
                    self.teacher,
                    self.out / "pairs",
                    cfg.pairs,
                    cfg.pair_steps,
                    guidance,
                    chunk=cfg.pair_chunk,
                    batch=batch,
                    captions=self.prompts,
                    d=self.d,
                )
                self.data["pairs_seconds"] = round(time.perf_counter() - t, 2)  # the real-size smoke's figure
            if self.d.is_main and not self.held_file.is_file():  # teacher samples held out for the decoder report
                with atomic_file(self.held_file) as tmp:
                    save_file({"x0": p["x0"][-256:].contiguous()}, str(tmp))
            self.d.barrier()
            self.data["pairs"] = {k: v.to(self.dev) for k, v in p.items()}
        return self.data["pairs"]

    def real_latents(self, n: int, seed: int):
        """n latents drawn from the cache's per-image Gaussians, scaled as the U-Net sees them."""
        c = self.cache()
        g = torch.Generator().manual_seed(seed)
        mean, std = c["mean"][:n], c["std"][:n]
        return (mean + std * torch.randn(mean.shape, generator=g).to(self.dev)) * self.teacher.latent_scaling

    def one_step_pipe(self, unet, vae, name: str):
        from sdxs_edge.models import Components
        from sdxs_edge.pipeline import SDXSPipeline

        sched = {**self.sched_cfg, "prediction_type": self.cfg.student_prediction_type}
        p = SDXSPipeline(Components(self.teacher.c.tokenizer, self.teacher.c.text_encoder, unet, vae, sched), name=name)
        p.default_steps, p.default_guidance = 1, 0.0
        return p


def _load_generic_teacher(r: _Run) -> None:
    """Any SD-1.x / 2.x teacher (folder or preset), checked before any training, with the prompts, the
    image folder (encoded now, so a bad image stops the run here) and the derived student layout."""
    from sdxs_edge.pipeline import SDXSPipeline
    from training import generic

    cfg = r.cfg
    r.prompts = generic.read_prompts(cfg.prompts)
    if Path(cfg.teacher).is_dir():
        generic.check_teacher_folder(Path(cfg.teacher))
    r.teacher = SDXSPipeline.load(cfg.teacher).to(r.dev)
    generic.check_teacher_pipe(r.teacher)
    if cfg.resolution:
        generic.check_resolution(r.teacher, cfg.resolution)
        r.teacher.c.unet.register_to_config(sample_size=cfg.resolution // 8)
    r.preset = generic.student_preset(dict(r.teacher.c.unet.config), cfg.student_preset)
    if cfg.images:
        r.cache()


def _teacher_stage(r: _Run) -> None:
    """Reuse the committed teacher, or train one with `teacher_cfg`; with a prompt file, any SD teacher."""
    from diffusers import DDPMScheduler

    from sdxs_edge.pipeline import SDXSPipeline
    from sdxs_edge.presets import get_preset

    cfg = r.cfg
    if cfg.prompts:
        _load_generic_teacher(r)
        r.report = {"teacher": str(cfg.teacher)}
    else:
        r.teacher_dir = Path(cfg.teacher) if cfg.teacher else train_teacher(cfg.teacher_cfg, r.out / "teacher")
        r.teacher = SDXSPipeline.load(r.teacher_dir).to(r.dev)
        r.report = {"teacher": str(r.teacher_dir)}
        r.preset = get_preset(cfg.student_preset)
    r.sched_cfg = {k: v for k, v in r.teacher.c.scheduler_config.items() if not k.startswith("_")}
    keep = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type")
    r.acp = DDPMScheduler(**{k: v for k, v in r.sched_cfg.items() if k in keep}).alphas_cumprod
    r.empty = r.teacher.tokenize([""])[0]


def _decoder_stage(r: _Run) -> None:
    """Tiny decoder distilled on real latents and teacher samples."""
    from safetensors.torch import load_file

    from sdxs_edge.models import build_vae

    done = r.out / "decoder" / "vae"
    r.student_vae = build_vae(r.preset).to(r.dev)  # built either way: it draws from torch's global generator
    if done.is_dir():
        from diffusers import AutoencoderTiny

        r.student_vae = AutoencoderTiny.from_pretrained(done, torch_dtype=torch.float32).to(r.dev)
    else:
        pool = torch.cat([r.real_latents(len(r.cache()["mean"]), seed=0), r.pairs()["x0"]])
        distill_decoder(r.cfg.decoder, r.out / "decoder", r.teacher.c.vae, r.student_vae, pool)
        if r.d.is_main:
            _save_model_folder(r.student_vae, done)
    if not r.held_file.is_file():
        r.pairs()
    r.held = load_file(str(r.held_file))["x0"].to(r.dev)
    r.report = {"decoder": decoder_report(r.teacher.c.vae, r.student_vae, r.held)}


def _unet_kd_stage(r: _Run) -> None:
    """Block-removed U-Net, initialized from the teacher's layers and distilled (output and features)."""
    from diffusers import UNet2DConditionModel

    done = r.out / "unet-kd" / "unet"
    if done.is_dir():
        r.kd_unet = UNet2DConditionModel.from_pretrained(done, torch_dtype=torch.float32).to(r.dev)
        return
    r.kd_unet, init = build_student(r.teacher.c.unet, r.preset.layer_map, r.preset.unet if r.prompts else None)
    r.kd_unet.to(r.dev)
    (r.out / "unet-kd").mkdir(parents=True, exist_ok=True)
    if r.d.is_main:
        write_atomic(r.out / "unet-kd" / "init.json", json.dumps(init, indent=2))
    t, cache = r.teacher.c, r.cache()
    r.kd_unet = distill_unet(r.cfg.unet_kd, r.out / "unet-kd", t.unet, t.text_encoder, r.kd_unet, cache, r.empty, r.acp)
    if r.d.is_main:
        _save_model_folder(r.kd_unet, done)


def _consts(r: _Run):
    from sdxs_edge import sampler

    return sampler.one_step_constants(
        {**r.sched_cfg, "prediction_type": r.cfg.student_prediction_type}, r.teacher.latent_scaling
    )


def _warmup_stage(r: _Run) -> None:
    """One-step warm-up: regress the teacher's ODE endpoints from noise."""
    import copy

    from sdxs_edge.pipeline import SDXSPipeline

    done = r.out / "model-warmup"
    if done.is_dir():
        r.warm = SDXSPipeline.load(done).to(r.dev)
        return
    student, t = copy.deepcopy(r.kd_unet), r.teacher.c
    student = warmup(r.cfg.warmup, r.out / "warmup", student, t.text_encoder, t.unet, r.pairs(), _consts(r))
    r.warm = r.one_step_pipe(student, r.student_vae, "shapes one-step (warm-up only)")
    if r.d.is_main:
        r.warm.save_pretrained(done)


def _score_distill_stage(r: _Run) -> None:
    """Segmented score distillation from the warm-up student."""
    import copy

    from sdxs_edge.pipeline import SDXSPipeline

    done = r.out / "model-ssd"
    if done.is_dir():
        r.final = SDXSPipeline.load(done).to(r.dev)
        return
    student = copy.deepcopy(r.warm.c.unet)
    t = r.teacher.c
    pt = r.sched_cfg.get("prediction_type", "epsilon")
    student = score_distill(
        r.cfg.ssd,
        r.out / "ssd",
        student,
        t.text_encoder,
        t.unet,
        r.pairs(),
        _consts(r),
        r.acp,
        r.empty,
        teacher_prediction=pt,
    )
    r.final = r.one_step_pipe(student, r.student_vae, "sdxs-shapes one-step")
    if r.d.is_main:
        r.final.save_pretrained(done)


def _decoder_adapt_stage(r: _Run) -> None:
    """Decoder adaptation: the tiny decoder was distilled on latents of real images and teacher samples;
    the one-step generator's latents sit slightly off that manifold, where a 36k-parameter decoder errs
    far more than the teacher's. A short second distillation on a pool that adds the generator's own
    latents (teacher decoder as the target, same loss) closes that gap."""
    import copy

    from safetensors.torch import load_file

    from sdxs_edge import shapes
    from sdxs_edge.pipeline import SDXSPipeline

    done, cfg = r.out / "model", r.cfg
    if done.is_dir():
        r.final = SDXSPipeline.load(done).to(r.dev)
    elif cfg.decoder_adapt.steps > 0:
        real = r.real_latents(min(len(r.cache()["mean"]), cfg.adapt_latents), seed=1)
        if r.prompts:
            caps = [r.prompts[i % len(r.prompts)] for i in range(cfg.adapt_latents)]
        else:
            caps = [s.caption for s in shapes.eval_scenes(cfg.adapt_latents, seed=4243)]  # not an eval seed
        gen = [
            r.final.generate(caps[i : i + 256], seed=50_000 + i, output="tensor").latents
            for i in range(0, len(caps), 256)
        ]
        pool = torch.cat([real, torch.cat(gen), load_file(str(r.held_file))["x0"].to(r.dev)])
        adapted = copy.deepcopy(r.final.c.vae)
        distill_decoder(cfg.decoder_adapt, r.out / "decoder-adapt", r.teacher.c.vae, adapted, pool)
        r.final = r.one_step_pipe(r.final.c.unet, adapted, "sdxs-shapes one-step")
    if r.d.is_main and not done.is_dir():
        r.final.save_pretrained(done)
    r.report["decoder_adapted"] = decoder_report(r.teacher.c.vae, r.final.c.vae, r.held)


def _generic_report(r: _Run) -> None:
    """Any teacher: per-stage losses, grids of the first 16 prompts per model, parameters, CPU latency."""
    from sdxs_edge.evaluate import save_grid
    from sdxs_edge.models import Components, count_parameters
    from sdxs_edge.pipeline import SDXSPipeline
    from training.generic import stage_losses

    cfg, t = r.cfg, r.teacher
    kd = SDXSPipeline(
        Components(t.c.tokenizer, t.c.text_encoder, r.kd_unet, t.c.vae, dict(r.sched_cfg)), name="block-removed student"
    )
    rows = (
        ("teacher", t, cfg.eval_steps, t.default_guidance),
        ("block-removed (KD)", kd, cfg.eval_steps, t.default_guidance),
        ("one-step, warm-up only", r.warm, 1, 0.0),
        ("one-step", r.final, 1, 0.0),
    )
    caps = r.prompts[:16]
    r.report.update(
        teacher=str(cfg.teacher),
        prompts=str(cfg.prompts),
        n_prompts=len(r.prompts),
        images=cfg.images,
        resolution=t.resolution,
        model=str(r.out / "model"),
    )
    r.report["losses"], r.report["models"] = stage_losses(r.out), {}
    for k, (name, pipe, steps, guidance) in enumerate(rows):
        out = pipe.generate(caps, seed=0, steps=steps, guidance=guidance, output="tensor").images
        images = ((out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        grid = save_grid(images, r.out / f"grid-{k}-{name.split(',')[0].split(' ')[0]}.png", cols=8)
        r.report["models"][name] = {
            "steps": steps,
            "unet_params": count_parameters(pipe.c.unet),
            "cpu_latency_s": _latency(pipe, steps, guidance, cfg.latency_runs),
            "grid": Path(grid).name,
        }


def _report_stage(r: _Run) -> None:
    """SHAPES-64 scores, grids, parameter counts and CPU latency of the teacher and every student (rank 0)."""
    from sdxs_edge.evaluate import EvalSettings, Evaluator, evaluate_pipeline, save_grid
    from sdxs_edge.models import Components, count_parameters
    from sdxs_edge.pipeline import SDXSPipeline

    if not r.d.is_main:
        return None
    if r.prompts:
        return _generic_report(r)
    cfg, t = r.cfg, r.teacher
    ev = Evaluator.load()
    kd_parts = Components(t.c.tokenizer, t.c.text_encoder, r.kd_unet, t.c.vae, dict(r.sched_cfg))
    rows = [
        ("teacher", t, cfg.eval_steps, t.default_guidance),
        (
            "block-removed (KD)",
            SDXSPipeline(kd_parts, name="block-removed student"),
            cfg.eval_steps,
            t.default_guidance,
        ),
        ("one-step, warm-up only", r.warm, 1, 0.0),
        ("one-step, score distillation", r.final, 1, 0.0),
    ]
    r.report["models"] = {}
    for name, pipe, steps, guidance in rows:
        rep, images = evaluate_pipeline(pipe, EvalSettings(n=cfg.eval_n, steps=steps, guidance=guidance), ev)
        slug = name.split(",")[0].replace(" ", "-").replace("(", "").replace(")", "") + (
            "-ssd" if "score" in name else ""
        )
        save_grid(images, r.out / f"grid-{slug}.png")
        rep["unet_params"] = count_parameters(pipe.c.unet)
        rep["decoder_params"] = count_parameters(pipe.c.vae.decoder)
        rep["cpu_latency_s"] = _latency(pipe, steps, guidance, cfg.latency_runs)
        r.report["models"][name] = rep


@dataclass(frozen=True)
class Stage:
    """One row of the chain: its timing name, what it runs, the ChainConfig field that is its recipe, and
    the `until` value that stops the chain after it (None: the chain goes on)."""

    name: str
    run: Callable[[_Run], None]
    config: str | None
    stop: str | None = None


CHAIN: tuple[Stage, ...] = (
    Stage("teacher", _teacher_stage, "teacher_cfg", stop="teacher"),
    Stage("decoder", _decoder_stage, "decoder", stop="decoder"),
    Stage("unet-kd", _unet_kd_stage, "unet_kd", stop="unet-kd"),
    Stage("warmup", _warmup_stage, "warmup"),
    Stage("score-distill", _score_distill_stage, "ssd"),
    Stage("decoder-adapt", _decoder_adapt_stage, "decoder_adapt", stop="onestep"),
    Stage("report", _report_stage, "eval_n"),
)


def run_chain(cfg: ChainConfig, out: str | Path, until: str = "all") -> dict:
    """Run the chain (`CHAIN`, in order) up to stage `until`, each stage resuming from its own folder;
    returns the report (for "teacher": the teacher folder)."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    from training import dist

    d = dist.init()
    per_process = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, min(cfg.threads, per_process)))
    dev = dist.device()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(out)
    if cfg.prompts:
        from training.generic import precheck

        precheck(cfg.teacher, cfg.prompts, cfg.images)
    check_run_folder(cfg, out)
    d.barrier()  # every rank has read the run folder before rank 0 writes its config
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.json", json.dumps(asdict(cfg), indent=2, default=str))
    d.barrier()
    clock = StageClock(out / "times.json", write=d.is_main)
    r = _Run(cfg, out, dev, d)
    peaks = {}  # peak GPU memory per stage, MiB allocated by torch (CUDA only)
    for stage in CHAIN:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        stage.run(r)
        d.barrier()  # what a stage saved is on disk before any rank looks for it
        clock.lap(stage.name)
        if dev.type == "cuda":
            peaks[stage.name] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        if stage.stop == until:
            return r.report
    r.report["stage_seconds"] = clock.times
    if peaks:
        r.report["peak_gpu_mib"] = peaks
    if "pairs_seconds" in r.data:
        r.report["pairs_seconds"] = r.data["pairs_seconds"]
    if d.is_main:
        write_atomic(out / "report.json", json.dumps(r.report, indent=2))
        text = format_generic_report(r.report) if r.prompts else format_chain_report(r.report)
        write_atomic(out / "report.md", text)
    return r.report


RESUMABLE_CHANGES = ("threads", "eval_n", "eval_steps", "latency_runs")  # settings a rerun may change and still resume


def check_run_folder(cfg: ChainConfig, out: Path) -> None:
    """Resume only a run of the same config: an `out` that holds another run's config.json, or checkpoints
    without one, is refused before anything is written."""
    from training.generic import TrainingInputError

    f = out / "config.json"
    if not f.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise TrainingInputError(
                f"--out {out} is not empty and holds no chain run (config.json); choose another folder"
            )
        return
    old = json.loads(f.read_text())
    new = json.loads(json.dumps(asdict(cfg), default=str))
    differ = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if differ:
        raise TrainingInputError(
            f"--out {out} holds another run (its config differs in {', '.join(differ)}); resume it with the same settings or choose another folder"
        )


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
