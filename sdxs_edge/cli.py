"""`sdxs-edge` command line. Errors are one line on stderr with exit code 2; `--debug` shows tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from sdxs_edge import control as _control
from sdxs_edge.atomic import atomic_file, write_atomic
from sdxs_edge.cli_args import control_scale, lora_scale, positive, strength, warnings_as_lines
from sdxs_edge.errors import SDXSError
from sdxs_edge.images import save_image

DEFAULT_MODEL = Path(__file__).parent / "default_model"


def _quiet_libraries() -> None:
    # diffusers imports torchao (pulled in by executorch) which prints loader noise on CPU builds.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # transformers 5 draws a "Loading weights" bar per text encoder load; the hub's switch turns it off
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging
    import warnings

    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # its Enum deprecation, at executorch import
    warnings.filterwarnings("ignore", module="torchao")
    warnings.filterwarnings("ignore", category=FutureWarning)


def resolve_model(model: str | None) -> str:
    """The model argument, or the embedded default when none is given."""
    if model:
        return model
    if not (DEFAULT_MODEL / "model_index.json").is_file():
        raise SDXSError(f"the embedded default model is missing at {DEFAULT_MODEL}; pass --model PRESET|PATH")
    return str(DEFAULT_MODEL)


def fetch_named_models(args) -> None:
    """`--allow-download`: put the hub ids a command names into the local cache before it runs; every
    load after that reads the cache only (`SDXSPipeline.load(..., allow_download=False)`)."""
    from sdxs_edge.pipeline import fetch_hub_model, is_hub_id

    self_check = getattr(args, "reference", None) == "none"  # `parity --reference none` loads no model
    names = [getattr(args, a, None) for a in ("model", "teacher", "student")]
    names += [] if self_check else [getattr(args, "reference", None)]
    if (
        getattr(args, "bundle", None)
        and not self_check
        and (getattr(args, "runtime", None) == "torch" or args.command == "parity")
    ):
        from sdxs_edge.bundle import load_manifest

        names.append(load_manifest(args.bundle, verify=False)["source"]["model"])
    for name in names:
        if name and is_hub_id(str(name)):
            fetch_hub_model(str(name), allow_download=True)


# ---- generate ----------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from sdxs_edge.pipeline import SDXSPipeline

    if args.lora_scale is not None and args.lora is None:
        raise SDXSError("--lora-scale needs --lora PATH")
    if args.control is not None and args.controlnet is None:
        raise SDXSError("--control needs a ControlNet: pass --controlnet PATH (a folder built for the model's U-Net)")
    if args.controlnet is not None and args.control is None:
        raise SDXSError(
            "--controlnet needs a control image: pass --control IMAGE (e.g. an edge map from `sdxs-edge canny`)"
        )
    if args.control_scale is not None and args.controlnet is None:
        raise SDXSError("--control-scale needs --controlnet PATH")
    res = args.resolution
    if res is not None and res % 8:
        raise SDXSError(f"--resolution must be a multiple of 8, got {res}")
    if args.strength is not None and args.image is None:
        raise SDXSError("--strength is for image-to-image: give --image PATH too")
    if args.encoder is not None and args.image is None:
        raise SDXSError("--encoder is for image-to-image: give --image PATH too")
    if args.encoder is not None:  # a bad folder fails before the model is loaded
        from sdxs_edge.pipeline import check_vae_folder

        check_vae_folder(args.encoder)
    lora, lora_scale = None, 1.0 if args.lora_scale is None else args.lora_scale
    if args.lora is not None:  # a bad LoRA file fails before the model is loaded
        from sdxs_edge.lora import load_lora

        lora = load_lora(args.lora)
    controlnet = None
    if args.controlnet is not None:  # a bad folder fails before the model is loaded
        from sdxs_edge.controlnet import load_controlnet

        controlnet = load_controlnet(args.controlnet)
    t = time.perf_counter()
    pipe = SDXSPipeline.load(resolve_model(args.model))
    fused: list[str] = []
    if lora is not None:
        from sdxs_edge.lora import fuse_lora

        fused = fuse_lora(pipe.c.unet, lora, scale=lora_scale)
    control = None
    if controlnet is not None:
        import torch

        from sdxs_edge.control import load_control_image

        pipe.attach_controlnet(controlnet)  # ControlNetMismatchError: built for another U-Net
        control = torch.from_numpy(warnings_as_lines(load_control_image, args.control, res or pipe.resolution))
    init = None
    if args.image is not None:
        from sdxs_edge.init_image import load_init_image

        side = res or pipe.resolution
        init = warnings_as_lines(load_init_image, args.image, side, side)
        pipe.attach_encoder(args.encoder)
    load_s = time.perf_counter() - t
    noise = pipe.noise(len(args.prompt), args.seed, resolution=res)
    control_scale = 1.0 if args.control_scale is None else args.control_scale
    gen = pipe.generate(
        args.prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        noise=noise,
        control_image=control,
        control_scale=control_scale,
        image=init,
        strength=args.strength,
    )
    outs = (
        [Path(args.out)]
        if len(gen.images) == 1
        else [
            Path(args.out).with_name(f"{Path(args.out).stem}-{i}{Path(args.out).suffix}")
            for i in range(len(gen.images))
        ]
    )
    for img, out in zip(gen.images, outs):
        save_image(img, out)
    steps = args.steps or pipe.default_steps
    print(
        f"model {pipe.name}  ({steps} step{'s' * (steps > 1)}, guidance {args.guidance if args.guidance is not None else pipe.default_guidance}, seed {args.seed})"
    )
    if lora is not None:
        print(f"lora  {args.lora}  (fused into {len(fused)} U-Net layers, scale {lora_scale:g})")
    if controlnet is not None:
        print(f"controlnet  {args.controlnet}  (control {args.control}, scale {control_scale:g})")
    if init is not None:
        print(
            f"image {args.image}  (strength {0.8 if args.strength is None else args.strength:g}, encoder {args.encoder or 'the model VAE'})"
        )
    print(f"  load          {load_s * 1000:9.1f} ms")
    for k, v in gen.timings.items():
        print(f"  {k:<13} {v * 1000:9.1f} ms")
    print(f"  total         {sum(gen.timings.values()) * 1000:9.1f} ms  (excluding load)")
    for out in outs:
        print(f"wrote {out}")
    return 0


# ---- canny -------------------------------------------------------------------------------------------
def cmd_canny(args) -> int:
    """Edge map of an image (white canny edges on black, PNG), as a ControlNet's control image."""
    import numpy as np
    from PIL import Image

    from sdxs_edge.control import ControlImageError, canny, open_image

    src, out = Path(args.image), Path(args.out)
    if out.suffix.lower() != ".png":
        raise SDXSError(f"OUT must end in .png (edge maps are stored losslessly), got {out.name!r}")
    with open_image(src, "image") as im:
        img = im.convert("RGB")
    if min(img.size) < 3:
        raise ControlImageError(f"image {src} is {img.size[0]}x{img.size[1]}; too small for edges")
    if args.low >= args.high:
        raise SDXSError(f"--low ({args.low:g}) must be below --high ({args.high:g})")
    edges = canny(np.asarray(img), low=args.low, high=args.high)
    with atomic_file(out) as tmp:
        Image.fromarray(edges).save(tmp, format="PNG")
    print(
        f"wrote {out}  ({img.size[0]}x{img.size[1]}, {100 * float((edges > 0).mean()):.1f}% edge pixels, thresholds {args.low:g}/{args.high:g})"
    )
    return 0


# ---- info --------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from sdxs_edge.info import format_info, model_info

    rep = model_info(args.model, flops=not args.no_flops)
    print(json.dumps(rep, indent=2) if args.json else format_info(rep))
    return 0


# ---- eval --------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from sdxs_edge.evaluate import (
        EvalSettings,
        Evaluator,
        evaluate_pipeline,
        format_report,
        read_prompt_file,
        save_grid,
    )
    from sdxs_edge.pipeline import SDXSPipeline

    prompts = read_prompt_file(args.prompts) if args.prompts else None
    ev = Evaluator.load()
    pipe = SDXSPipeline.load(resolve_model(args.model))
    settings = EvalSettings(n=args.n, steps=args.steps, guidance=args.guidance, batch=args.batch, seed=args.seed)
    rep, images = evaluate_pipeline(pipe, settings, ev, prompts)
    rep["model"] = pipe.name
    print(format_report(rep))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = save_grid(images, out / "grid.png")
    write_atomic(out / "eval.json", json.dumps(rep, indent=2))
    print(f"wrote {out / 'eval.json'} and {grid}")
    return 0


# ---- train -------------------------------------------------------------------------------------------
def _chain_config(args):
    """The chain's config from the flags: the SHAPES-64 chain (--preset), or any teacher (--prompts)."""
    from dataclasses import replace

    from training.chain import ChainConfig, gpu_chain, smoke_chain

    if args.prompts:
        cfg = smoke_chain() if args.smoke else (gpu_chain() if args.recipe == "gpu" else ChainConfig())
        if args.recipe not in ("cpu", "gpu"):
            from training.recipes import recipe_chain

            cfg = recipe_chain(args.recipe, cfg, smoke=args.smoke)
        return replace(
            cfg,
            teacher=args.teacher,
            student_preset=args.student,
            prompts=args.prompts,
            images=args.images,
            resolution=args.resolution or cfg.resolution,
        )
    if args.recipe not in ("cpu", "gpu"):
        raise SDXSError(f"--recipe {args.recipe} goes with --teacher PATH_OR_PRESET --prompts FILE")
    if args.images or args.resolution:
        raise SDXSError("--images and --resolution go with --prompts FILE (the chain on any teacher)")
    if args.preset not in ("shapes", "tiny"):
        raise SDXSError(f"the distillation chain has presets 'shapes' and 'tiny' (smoke); got {args.preset!r}")
    cfg = (
        smoke_chain()
        if args.smoke or args.preset == "tiny"
        else (gpu_chain() if args.recipe == "gpu" else ChainConfig())
    )
    if args.teacher:
        return replace(cfg, teacher=args.teacher)
    return replace(cfg, teacher=None) if args.retrain_teacher else cfg


def cmd_train(args) -> int:
    from dataclasses import asdict, replace

    if args.stage == "evaluator":
        from training.evaluator import EvaluatorConfig, train_evaluator

        cfg = EvaluatorConfig(steps=args.steps) if args.steps else EvaluatorConfig()
        if args.style:
            cfg = replace(cfg, style=args.style)
        if args.smoke:
            cfg = replace(cfg, steps=4, batch=8)
        if args.dry_run:
            print(json.dumps(asdict(cfg), indent=2))
            return 0
        out = Path(args.out or "runs/evaluator")
        acc = train_evaluator(cfg, out)
        print(f"held-out accuracy: {json.dumps(acc)}\nwrote {out / 'evaluator'}")
        return 0
    if args.stage == "controlnet":
        from training.controlnet import format_report, get_config, run_controlnet

        cfg = get_config("smoke" if args.smoke else "cpu", teacher=args.teacher, student=args.student)
        if args.steps:
            cfg = replace(cfg, student_cn=replace(cfg.student_cn, steps=args.steps))
        if args.dry_run:
            print(json.dumps(asdict(cfg), indent=2))
            return 0
        rep = run_controlnet(cfg, args.out or ("runs/smoke-controlnet" if args.smoke else "runs/controlnet"))
        print(format_report(rep))
        return 0
    if args.stage == "lora":
        from training.lora import LoRAChainConfig, format_lora_report, run_lora_chain, smoke_lora_chain

        teacher, student = args.teacher or "models/shapes-teacher", args.student or str(DEFAULT_MODEL)
        cfg = smoke_lora_chain(teacher, student) if args.smoke else LoRAChainConfig(teacher=teacher, student=student)
        if args.steps:
            cfg = replace(cfg, distill=replace(cfg.distill, ssd=replace(cfg.distill.ssd, steps=args.steps)))
        if args.threads:
            cfg = replace(cfg, threads=args.threads)
        if args.dry_run:
            print(json.dumps(asdict(cfg), indent=2, default=str))
            return 0
        for name, folder in (("teacher", teacher), ("student", student)):
            if not (Path(folder) / "model_index.json").is_file():
                raise SDXSError(f"{name} folder {folder} is not a model folder (no model_index.json)")
        rep = run_lora_chain(cfg, args.out or ("runs/smoke-lora" if args.smoke else "runs/lora-outline"))
        print(format_lora_report(rep))
        return 0
    if args.stage == "teacher" and not args.smoke:
        from training.teacher import TeacherConfig, train_teacher

        preset = {"shapes": "shapes-teacher"}.get(args.preset, args.preset)
        cfg = TeacherConfig(preset=preset)
        if args.steps:
            cfg = replace(cfg, unet_steps=args.steps)
        if args.dry_run:
            print(json.dumps(asdict(cfg), indent=2))
            return 0
        print(f"wrote {train_teacher(cfg, args.out or 'runs/shapes-teacher')}")
        return 0
    from training.chain import format_chain_report, format_generic_report, run_chain

    cfg = _chain_config(args)
    if args.dry_run:
        print(json.dumps(asdict(cfg), indent=2, default=str))
        return 0
    if cfg.teacher and not cfg.prompts and not (Path(cfg.teacher) / "model_index.json").is_file():
        raise SDXSError(f"teacher folder {cfg.teacher} not found; pass --teacher PATH or --retrain-teacher")
    default_out = "runs/sdxs" if cfg.prompts else "runs/shapes-sdxs"
    report = run_chain(cfg, args.out or ("runs/smoke-chain" if args.smoke else default_out), until=args.stage)
    if os.environ.get("RANK", "0") != "0":  # one process of torchrun / accelerate launch: rank 0 reports
        return 0
    if "models" in report:
        print(format_generic_report(report) if cfg.prompts else format_chain_report(report))
    else:
        print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdxs-edge", description="One-step SDXS text-to-image: generate, train, convert, run on device."
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="fetch the Hugging Face hub ids this command names (model, reference, a bundle's source) when the local cache lacks them; without it nothing is downloaded",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images from text with a model or preset")
    g.add_argument("prompt", nargs="+", help="one or more prompts (one image each, one batch)")
    g.add_argument("--model", help="preset name, diffusers folder or hub id (default: the embedded SHAPES-64 model)")
    g.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same image)")
    g.add_argument(
        "--steps", type=positive(int, "--steps"), help="U-Net evaluations (default: the model's; 1 for SDXS)"
    )
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale; <= 1 disables it")
    g.add_argument(
        "--resolution",
        type=positive(int, "--resolution"),
        help="image side in pixels (multiple of 8; default: the model's)",
    )
    g.add_argument("--out", default="out.png", help="output image (several prompts: out-0.png, out-1.png, ...)")
    g.add_argument(
        "--lora", type=Path, metavar="PATH", help="U-Net LoRA (safetensors) fused into the weights before generating"
    )
    g.add_argument("--lora-scale", type=lora_scale, metavar="S", help="LoRA strength (default 1.0; needs --lora)")
    g.add_argument(
        "--controlnet",
        type=Path,
        metavar="PATH",
        help="ControlNet folder (diffusers ControlNetModel, safetensors) built for the model's U-Net; needs --control",
    )
    g.add_argument(
        "--control",
        metavar="IMAGE",
        help="control image for --controlnet, e.g. an edge map from `sdxs-edge canny` (square; resized with a warning if its size differs)",
    )
    g.add_argument(
        "--control-scale",
        type=control_scale,
        metavar="S",
        help="ControlNet conditioning scale (default 1.0; needs --controlnet)",
    )
    g.add_argument(
        "--image",
        metavar="PATH",
        help="image-to-image: start from this image (RGB, no alpha; resized with a warning if its size differs)",
    )
    g.add_argument(
        "--strength",
        type=strength,
        metavar="S",
        help="image-to-image strength in (0, 1]: how far from --image to go (default 0.8; needs --image)",
    )
    g.add_argument(
        "--encoder",
        metavar="VAE_DIR",
        help="image-to-image: encode with this VAE folder (e.g. the teacher's MODEL/vae) instead of the model's tiny encoder",
    )
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "canny", help="canny edge map of an image (white edges on black), for use as a ControlNet control image"
    )
    c.add_argument("image", help="input image (any size; converted to RGB)")
    c.add_argument("out", help="output edge map (.png)")
    c.add_argument(
        "--low",
        type=float,
        default=_control.LOW,
        help=f"hysteresis low threshold on the Sobel magnitude, 0-255 units (default {_control.LOW:g})",
    )
    c.add_argument(
        "--high", type=float, default=_control.HIGH, help=f"hysteresis high threshold (default {_control.HIGH:g})"
    )
    c.set_defaults(func=cmd_canny)

    i = sub.add_parser("info", help="parameters, FLOPs and size per component")
    i.add_argument("model", help="preset name, diffusers folder or hub id")
    i.add_argument("--no-flops", action="store_true", help="skip the FLOP count (which runs one forward per component)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser(
        "eval", help="SHAPES-64 prompt-following: attribute accuracy, all-correct rate, FID-shapes, grid"
    )
    e.add_argument("model", nargs="?", help="preset, folder or hub id (default: the embedded model)")
    e.add_argument("--n", type=positive(int, "--n"), default=512, help="number of evaluation prompts")
    e.add_argument("--steps", type=positive(int, "--steps"), help="sampling steps (default: the model's)")
    e.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    e.add_argument("--prompts", help="file of SHAPES-64 captions, one per line (default: the fixed evaluation set)")
    e.add_argument("--batch", type=positive(int, "--batch"), default=64, help="images per batch")
    e.add_argument("--seed", type=int, default=0, help="evaluation seed")
    e.add_argument("--out", default="out/eval", help="folder for eval.json and grid.png")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser(
        "train",
        help="train a stage: teacher, evaluator, decoder, unet-kd, onestep, all (the SDXS chain), controlnet (canny ControlNets), or lora (an outline style LoRA, distilled to one step)",
    )
    t.add_argument(
        "stage",
        choices=["teacher", "evaluator", "decoder", "unet-kd", "onestep", "all", "controlnet", "lora"],
        help="stage; chain stages run the chain up to and including it, resuming earlier stages",
    )
    t.add_argument("--preset", default="shapes", help="shapes (SHAPES-64) or tiny (smoke)")
    t.add_argument(
        "--teacher", help="trained teacher folder to distill from (default: the committed models/shapes-teacher)"
    )
    t.add_argument(
        "--student",
        help="controlnet, lora: the one-step student folder (default: the embedded model); chain with --prompts: the student preset (default: the teacher's block-removed layout with the TAESD decoder)",
    )
    t.add_argument(
        "--prompts",
        metavar="FILE",
        help="chain on any SD-1.x / 2.x teacher (--teacher PATH_OR_PRESET): prompt file, one per line, for the ODE pairs and score distillation",
    )
    t.add_argument(
        "--images",
        metavar="DIR",
        help="with --prompts: imagefolder (metadata.jsonl with file_name and text) for the decoder and U-Net KD (default: the teacher's own samples)",
    )
    t.add_argument(
        "--resolution",
        type=positive(int, "--resolution"),
        help="with --prompts: image side to distil at (default: the teacher's)",
    )
    t.add_argument(
        "--retrain-teacher",
        action="store_true",
        help="train the teacher as the chain's first stage instead of reusing one",
    )
    t.add_argument("--out", help="run folder (resumes from its last checkpoint)")
    t.add_argument("--steps", type=positive(int, "--steps"), help="override the main stage's step count")
    t.add_argument("--smoke", action="store_true", help="tiny settings that run in seconds (tests)")
    t.add_argument(
        "--recipe",
        choices=["cpu", "gpu", "sd21-512", "sd15-512"],
        default="cpu",
        help="chain budgets: cpu (sized for 2 cores), gpu (one CUDA GPU, wall-clock capped per stage; docs/training.md), or with --prompts a multi-GPU recipe for a real-size teacher, sd21-512 / sd15-512 (docs/any-teacher.md)",
    )
    t.add_argument(
        "--threads",
        type=positive(int, "--threads"),
        help="lora: CPU threads (default 2; use 1 when other jobs share the cores)",
    )
    t.add_argument(
        "--style",
        choices=["filled", "mixed"],
        help="evaluator only: train on filled renders (default) or on filled + outline renders with a style head (the style evaluator)",
    )
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)

    # convert (converters/), parity and run (runtimes/), bench (benchmarks/): light modules that import
    # their backends only when a command runs.
    from benchmarks.cli import add_parsers as add_bench
    from converters.cli import add_parsers as add_convert
    from runtimes.cli import add_parsers as add_runtime
    from server.cli import add_parser as add_serve

    add_convert(sub)
    add_runtime(sub)
    add_bench(sub)
    add_serve(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        if args.allow_download:
            fetch_named_models(args)
        return args.func(args) or 0
    except SDXSError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # an extra that is not installed (a deployment install has no PyTorch)
        if args.debug:
            raise
        top = (e.name or "").split(".")[0]
        hint = (
            " (pip install 'sdxs-edge[torch]')"
            if top in ("torch", "diffusers", "transformers", "safetensors", "tqdm")
            else ""
        )
        print(f"error: this command needs a package that is not installed: {e}{hint}", file=sys.stderr)
        return 2
    except Exception as e:  # unexpected: still one line unless --debug
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
