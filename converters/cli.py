"""`sdxs-edge convert`: the converters' subcommand, added by `sdxs_edge.cli` through `add_parsers`.

    sdxs-edge convert MODEL --target {onnx,executorch,coreml} --precision {fp32,fp16,int8} --out DIR
        [--components NAME ...] [--resolution N] [--calibration-prompts FILE | --calibration-captions N] [--overwrite]
        [--sizes WxH,WxH,... | --min-size WxH --max-size WxH] [--max-batch N]
        [--dynamic] [--palettize {4,6}] [--delegate {xnnpack,coreml}] [--batch N]
        [--lora PATH [--lora-scale S]] [--controlnet PATH [--control-scale S]] [--[no-]encoder] [--attention split-heads]
        [--onnx-calibration {minmax,minmax-average,percentile,mse}] [--dry-run]

The handler returns an exit code and raises SDXSError (UnsupportedConversion, ParityError, ...), which
the main CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from converters.calibration import DEFAULT_CAPTIONS
from converters.layouts import LAYOUTS, check_layout
from converters.registry import DELEGATES, ONNX_CALIBRATIONS, PALETTE_BITS, PRECISION_SPECS, UnsupportedConversion
from sdxs_edge import cli_args
from sdxs_edge.attention import ATTENTION_VARIANTS
from sdxs_edge.bundle import COMPONENT_NAMES, PRECISIONS, REQUIRED_COMPONENTS, TARGETS
from sdxs_edge.cpu import parse_classes


def _components(values: list[str] | None) -> list[str] | None:
    """--components accepts "unet decoder" and "unet,decoder" alike; None (not given) means all of the request's."""
    if values is None:
        return None
    return [c.strip() for v in values for c in v.split(",") if c.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the "convert" subcommand on an argparse subparsers object; returns its parser.

    Args:
        subparsers: the result of `ArgumentParser.add_subparsers()`.
    """
    pairs = ", ".join(f"{t}/{p}" for t, p in PRECISION_SPECS)
    p = subparsers.add_parser(
        "convert",
        help="convert a model into a bundle for ONNX, ExecuTorch or Core ML, checked against PyTorch",
        description=f"Lower a model's text encoder, U-Net and decoder into a bundle and check it against PyTorch. Supported target/precision pairs: {pairs}.",
    )
    p.add_argument("model", help="preset name, diffusers folder or hub id")
    p.add_argument("--target", required=True, choices=TARGETS, help="runtime format")
    p.add_argument("--precision", required=True, choices=PRECISIONS, help="weights / compute precision")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to create")
    p.add_argument(
        "--components",
        nargs="+",
        metavar="NAME",
        help=f"components to convert, of {' '.join(COMPONENT_NAMES)} (default: {' '.join(REQUIRED_COMPONENTS)}, and controlnet with --controlnet)",
    )
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    _add_size_options(p)
    p.add_argument(
        "--calibration-prompts",
        type=Path,
        metavar="FILE",
        help="int8 calibration prompts, one per line (default: 32 SHAPES-64 captions)",
    )
    p.add_argument(
        "--calibration-captions",
        type=cli_args.positive(int, "--calibration-captions"),
        metavar="N",
        help="int8: calibrate on N SHAPES-64 captions spread over the grammar instead of the default 32 (a fused LoRA may need 128)",
    )
    _add_quantization_options(p)
    _add_model_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="check the request, print it and exit without converting")
    p.set_defaults(func=run)
    return p


def _add_size_options(p: argparse.ArgumentParser) -> None:
    """--sizes / --min-size / --max-size and --max-batch: one bundle for several sizes and batches."""
    p.add_argument(
        "--sizes",
        type=cli_args.size_list,
        metavar="WxH,...",
        help="image sizes the bundle takes, width x height (e.g. 512x512,512x768); the first is the default",
    )
    p.add_argument(
        "--min-size",
        type=cli_args.size("--min-size"),
        metavar="WxH",
        help="with --max-size: every size between, in 64 px steps",
    )
    p.add_argument("--max-size", type=cli_args.size("--max-size"), metavar="WxH", help="with --min-size")
    p.add_argument(
        "--max-batch",
        type=cli_args.at_least("--max-batch"),
        default=1,
        metavar="N",
        help="a dynamic batch from 1 to N (default 1: the static --batch)",
    )


def sizes(args: argparse.Namespace):
    """The sizes --sizes or --min-size/--max-size name (None: the one --resolution)."""
    from sdxs_edge.sizes import SizeError, size_range

    if (args.min_size is None) != (args.max_size is None):
        raise UnsupportedConversion("--min-size and --max-size go together")
    if args.min_size is not None and args.sizes is not None:
        raise UnsupportedConversion("give --sizes or --min-size/--max-size, not both")
    if args.min_size is None:
        return args.sizes
    try:
        return size_range(args.min_size, args.max_size)
    except SizeError as e:
        raise UnsupportedConversion(str(e)) from None


def _add_quantization_options(p: argparse.ArgumentParser) -> None:
    """--overwrite, and how the bundle is lowered: quantization, delegate, batch, sensitivity pass."""
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument(
        "--dynamic", action="store_true", help="onnx int8: dynamic quantization instead of calibrated static QDQ"
    )
    p.add_argument(
        "--palettize",
        type=int,
        choices=PALETTE_BITS,
        help="coreml int8: k-means palettize weights to 4 or 6 bits instead of linear int8",
    )
    p.add_argument(
        "--delegate",
        choices=DELEGATES,
        default="xnnpack",
        help="executorch backend delegate (default xnnpack; coreml lowers here, runs on Apple devices)",
    )
    p.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    p.add_argument(
        "--no-sensitivity",
        action="store_true",
        help="int8: quantize every candidate node (skip the per-layer sensitivity pass)",
    )
    p.add_argument(
        "--jobs",
        type=cli_args.at_least("--jobs", 0),
        default=0,
        metavar="N",
        help="1: lower one component at a time; 0 (default): the largest in a second process beside the others where the machine has 2+ cores (Linux; onnx, executorch)",
    )
    p.add_argument(
        "--sensitivity-shortlist",
        type=cli_args.positive(int, "--sensitivity-shortlist"),
        metavar="N",
        help="int8: nodes the sensitivity pass re-scores one by one (default 16; one quantize-and-score each)",
    )
    p.add_argument(
        "--onnx-calibration",
        choices=ONNX_CALIBRATIONS,
        default="minmax",
        help="onnx int8: activation ranges from min/max (default), per-sample min/max averaged, the 99.999th percentile (small models: it holds every activation in memory), or mse: min/max shrunk per tensor to the least-squares clipping",
    )
    p.add_argument(
        "--max-float-fraction",
        type=cli_args.fraction,
        metavar="F",
        help="int8: share of quantized nodes the pass may keep in float (default 0.1)",
    )
    p.add_argument(
        "--trained",
        choices=("auto", "yes", "no"),
        default="auto",
        help="enforce the int8 image PSNR floor (auto: yes for folders, no for presets)",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """What goes into the bundle besides the model: seed, LoRA, ControlNet, attention layout, CPU classes."""
    p.add_argument("--seed", type=int, default=0, help="weight seed when MODEL is a preset")
    p.add_argument(
        "--lora",
        type=Path,
        metavar="PATH",
        help="U-Net LoRA (safetensors) to fuse into the weights before lowering; recorded in the manifest",
    )
    p.add_argument(
        "--lora-scale", type=cli_args.lora_scale, metavar="S", help="LoRA strength (default 1.0; needs --lora)"
    )
    p.add_argument(
        "--controlnet",
        type=Path,
        metavar="PATH",
        help="ControlNet folder (diffusers ControlNetModel, safetensors) built for MODEL's U-Net: lowered as its own component, the U-Net takes its residuals; recorded in the manifest",
    )
    p.add_argument(
        "--control-scale",
        type=cli_args.control_scale,
        metavar="S",
        help="ControlNet conditioning scale baked into the bundle (default 1.0; needs --controlnet)",
    )
    p.add_argument(
        "--encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lower the VAE's encoder for image-to-image (run --image PATH --strength S); the U-Net then takes its timestep as an input (default: yes for a trained model without --controlnet)",
    )
    p.add_argument(
        "--attention",
        choices=ATTENTION_VARIANTS,
        default="standard",
        help="attention layout: standard, or split-heads (one head at a time, as Apple's ml-stable-diffusion does for the Neural Engine; on CPU runtimes a smaller peak memory)",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="sdxs-edge",
        help="folder layout: sdxs-edge (default); optimum (ONNX: the folder optimum's ONNX Runtime diffusion pipeline loads); react-native-executorch (ExecuTorch fp32: adds react-native-executorch/ with the .pte programs, tokenizer.json and scheduler_config.json its useTextToImage hook loads; the app passes numSteps 2). The manifest stays, so run and parity work on every layout",
    )
    p.add_argument(
        "--cpu-classes",
        default="host",
        metavar="LIST",
        help="CPU classes to check the bundle on, comma-separated: host (this machine), x86-64-avx2 (emulated with qemu-x86_64-static -cpu Haswell), arm64 (ExecuTorch bundles, emulated with qemu-aarch64-static); recorded in the manifest (default: host)",
    )


def add_parsers(subparsers) -> None:
    """Register every converters subcommand (the hook `sdxs_edge.cli.build_parser` calls).

    Args:
        subparsers: the result of `ArgumentParser.add_subparsers()`.
    """
    add_parser(subparsers)


def run(args: argparse.Namespace) -> int:
    """Handle `sdxs-edge convert`; prints the bundle path and its parity figures."""
    from converters.api import convert

    components = _components(args.components)
    trained = {"auto": None, "yes": True, "no": False}[args.trained]
    if args.lora_scale is not None and args.lora is None:
        raise UnsupportedConversion("--lora-scale needs --lora PATH")
    if args.calibration_prompts is not None and args.calibration_captions is not None:
        raise UnsupportedConversion("give --calibration-prompts FILE or --calibration-captions N, not both")
    lora_scale = 1.0 if args.lora_scale is None else args.lora_scale
    if args.control_scale is not None and args.controlnet is None:
        raise UnsupportedConversion("--control-scale needs --controlnet PATH")
    control_scale = 1.0 if args.control_scale is None else args.control_scale
    if args.dry_run:
        print(json.dumps(dry_run(args, components, lora_scale, control_scale), indent=2))
        return 0
    out = convert(
        args.model,
        args.target,
        args.precision,
        args.out,
        components=components,
        resolution=args.resolution,
        calibration_prompts=args.calibration_prompts
        if args.calibration_prompts is not None
        else args.calibration_captions,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        dynamic=args.dynamic,
        palettize=args.palettize,
        delegate=args.delegate,
        batch=args.batch,
        sensitivity=not args.no_sensitivity,
        sensitivity_shortlist=args.sensitivity_shortlist,
        max_float_fraction=args.max_float_fraction,
        onnx_calibration=args.onnx_calibration,
        attention=args.attention,
        cpu_classes=parse_classes(args.cpu_classes),
        layout=args.layout,
        trained=trained,
        seed=args.seed,
        lora=args.lora,
        lora_scale=lora_scale,
        controlnet=args.controlnet,
        control_scale=control_scale,
        encoder=args.encoder,
        sizes=sizes(args),
        max_batch=args.max_batch,
        jobs=args.jobs,
    )
    print(summary(json.loads((out / "manifest.json").read_text()), out))
    return 0


def dry_run(args: argparse.Namespace, components, lora_scale: float, control_scale: float) -> dict:
    """The checked request as `--dry-run` prints it: the LoRA file and ControlNet folder are read, no model."""
    from converters.api import check_request
    from converters.request import default_encoder

    trained = {"auto": None, "yes": True, "no": False}[args.trained]
    comps = check_request(
        args.target,
        args.precision,
        components,
        args.dynamic,
        args.palettize,
        args.delegate,
        args.batch,
        args.resolution,
        args.lora,
        lora_scale,
        args.controlnet,
        control_scale,
        args.encoder if args.encoder is not None else default_encoder(args.model, trained, args.controlnet),
    )
    check_layout(args.layout, args.target, comps, args.controlnet, args.precision, args.delegate)
    from converters.request import check_size_options

    checked_sizes = check_size_options(
        sizes(args), args.max_batch, args.batch, args.resolution, args.controlnet, args.target
    )
    lora = None
    if args.lora is not None:  # the file is read and checked; whether it fits the U-Net needs the model
        from sdxs_edge.bundle import sha256_path
        from sdxs_edge.lora import load_lora, resolve_lora_path

        f = resolve_lora_path(args.lora)
        modules = {k.rsplit(".lora_A.", 1)[0] for k in load_lora(f) if ".lora_A." in k}
        lora = {"file": str(f), "sha256": sha256_path(f), "scale": lora_scale, "modules": len(modules)}
    controlnet = None
    if args.controlnet is not None:  # the folder is read and checked; whether it fits the U-Net needs the model
        from sdxs_edge.bundle import sha256_path
        from sdxs_edge.controlnet import load_controlnet

        cn = load_controlnet(args.controlnet)
        controlnet = {
            "folder": str(args.controlnet),
            "sha256": sha256_path(args.controlnet),
            "scale": control_scale,
            "block_out_channels": list(cn.config.block_out_channels),
        }
    spec = PRECISION_SPECS[(args.target, args.precision)]
    request = {
        "model": args.model,
        "target": args.target,
        "precision": args.precision,
        "out": str(args.out),
        "components": list(comps),
        "resolution": args.resolution,
        "sizes": [list(s) for s in checked_sizes] if checked_sizes else None,
        "max_batch": args.max_batch,
        "calibration_prompts": str(args.calibration_prompts)
        if args.calibration_prompts
        else f"{args.calibration_captions or DEFAULT_CAPTIONS} SHAPES-64 captions",
        "dynamic": args.dynamic,
        "palettize": args.palettize,
        "delegate": args.delegate,
        "batch": args.batch,
        "sensitivity": not args.no_sensitivity,
        "onnx_calibration": args.onnx_calibration,
        "attention": args.attention,
        "cpu_classes": list(parse_classes(args.cpu_classes)),
        "layout": args.layout,
        "trained": args.trained,
        "lora": lora,
        "controlnet": controlnet,
        "summary": spec.summary,
        "floor_snr_db": spec.tolerance.snr_db,
        "floor_image_psnr_db": spec.tolerance.image_psnr_db,
        "checked_here": "numeric" if spec.runs_here and args.delegate == "xnnpack" else "structural",
    }
    return request


def summary(manifest: dict, out: Path) -> str:
    """A few lines: where the bundle is and how it compares with PyTorch."""
    from sdxs_edge.sizes import bundle_sizes, fmt, max_batch

    lines = [
        f"bundle: {out} ({manifest['target']}/{manifest['precision']}, {', '.join(map(fmt, bundle_sizes(manifest)))}, batch up to {max_batch(manifest)}, {manifest['conversion']['seconds']:.1f} s)"
    ]
    cfg = manifest["conversion"].get("config", {})
    if cfg.get("lora"):
        lines.append(
            f"  lora: {cfg['lora']} fused into {cfg['lora_fused_modules']} U-Net layers (scale {cfg['lora_scale']:g})"
        )
    if cfg.get("controlnet"):
        lines.append(
            f"  controlnet: {cfg['controlnet']} (scale {cfg['control_scale']:g}); the U-Net takes its residuals"
        )
    for name, p in manifest["parity"]["components"].items():
        if p.get("checked") == "structural":
            lines.append(f"  {name}: structural check passed ({p['why']})")
        else:
            snr = "exact" if p["snr_db"] is None else f"{p['snr_db']:.1f} dB"
            lines.append(
                f"  {name}: SNR {snr} (floor {p['floor_snr_db']:.0f} dB), max abs error {p['max_abs_error']:.3g}"
            )
    e2e = manifest["parity"]["end_to_end"]
    if e2e.get("image_psnr_db") is not None or e2e.get("images"):
        psnr = "identical" if e2e["image_psnr_db"] is None else f"{e2e['image_psnr_db']:.1f} dB"
        lines.append(
            f"  end to end: image PSNR {psnr}"
            + ("" if e2e["enforced"] else f" (recorded, not enforced: {e2e['why_not_enforced']})")
        )
        if e2e.get("edge_iou"):
            lines.append(
                f"  edge IoU with the control images: lowered {e2e['edge_iou']['lowered']:.3f}, PyTorch {e2e['edge_iou']['pytorch']:.3f}"
            )
    else:
        lines.append(f"  end to end: {e2e['why_not_enforced']}")
    for rec in manifest["parity"].get("cpu_classes", []):
        worst = min((c["snr_db"] for c in rec["components"].values() if c.get("snr_db") is not None), default=None)
        lines.append(
            f"  checked as {rec['class']} ({rec['how']})"
            + (f": lowest component SNR {worst:.1f} dB" if worst is not None else "")
        )
    return "\n".join(lines)
