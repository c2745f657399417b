"""`sdxs-edge parity` and `sdxs-edge run`: the runtimes' subcommands, added by `sdxs_edge.cli`.

    sdxs-edge parity BUNDLE --runtime NAME [--reference MODEL|none] [--prompts FILE] [--seeds 0,1] [--json OUT]
                     [--width W --height H] [--batch N]   (default: every size of the bundle)
    sdxs-edge run BUNDLE "prompt" --runtime NAME --out img.png [--seed N] [--control IMAGE]
                  [--image PATH [--strength S]] [--width W --height H] [--batch N]
                  (N images: img-0.png .. img-<N-1>.png)

Handlers return an exit code and raise SDXSError (ParityError below the floors), which the main CLI
prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sdxs_edge import cli_args
from sdxs_edge.errors import SDXSError
from sdxs_edge.images import image_format, save_image


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {value!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds is empty")
    return seeds


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    from runtimes import RUNTIMES
    from runtimes.base import RNGS

    p.add_argument("--runtime", required=True, metavar="NAME", help=f"runtime: {', '.join(RUNTIMES)}")
    p.add_argument(
        "--providers",
        help="onnxruntime execution providers, comma-separated (cpu, coreml, nnapi, xnnpack, cuda; default cpu)",
    )
    p.add_argument(
        "--compute-units", help="coreml compute units: CPU_ONLY, CPU_AND_GPU, CPU_AND_NE or ALL (default ALL)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    p.add_argument(
        "--rng",
        choices=RNGS,
        default="torch",
        help="noise for the seed: torch (PyTorch's CPU torch.randn, diffusers' image for the seed; default) or numpy (the earlier numpy stream)",
    )
    p.add_argument("--width", type=cli_args.image_side("--width"), help="image width, one of the bundle's sizes")
    p.add_argument("--height", type=cli_args.image_side("--height"), help="image height, one of the bundle's sizes")
    p.add_argument(
        "--batch",
        type=cli_args.at_least("--batch"),
        help="images per run (default: the bundle's batch; at most its max_batch)",
    )


def runtime_options(args: argparse.Namespace) -> dict:
    """Keyword options for `runtimes.load` from the flags the user set (only those).

    Args:
        args: parsed arguments of `parity` or `run`.
    """
    opts: dict = {}
    if args.providers:
        opts["providers"] = [p.strip() for p in args.providers.split(",") if p.strip()]
    if args.compute_units:
        opts["compute_units"] = args.compute_units
    if args.no_verify:
        opts["verify"] = False
    return opts


def add_parsers(subparsers) -> None:
    """Register `parity` and `run` on the main CLI's subparsers (each sets `func` to its handler).

    Args:
        subparsers: the object `ArgumentParser.add_subparsers` returned.
    """
    p = subparsers.add_parser(
        "parity", help="compare a bundle on a runtime with its PyTorch source model (SNR, PSNR, all-correct)"
    )
    p.add_argument("bundle", help="bundle directory (converters' output)")
    _add_runtime_options(p)
    p.add_argument(
        "--reference",
        help="model to compare against (preset, folder or hub id; default: the bundle's source model); 'none': the PyTorch images recorded at conversion, without PyTorch (image PSNR on the recorded prompts and seeds)",
    )
    p.add_argument("--prompts", help="prompt file, one per line (default: 4 SHAPES-64 captions)")
    p.add_argument("--seeds", type=_seeds, help="comma-separated noise seeds (default 0)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the report as JSON")
    p.set_defaults(func=cmd_parity)

    r = subparsers.add_parser("run", help="generate one image from a bundle on a runtime, with per-component timing")
    r.add_argument("bundle", help="bundle directory (converters' output)")
    r.add_argument("prompt", help="the prompt")
    _add_runtime_options(r)
    r.add_argument("--reference", help="torch runtime only: model to run instead of the bundle's source")
    r.add_argument("--out", default="out.png", help="output image (.png, .jpg or .webp)")
    r.add_argument(
        "--seed",
        type=int,
        default=0,
        help="noise seed (same seed, same image on every runtime and in diffusers, see --rng)",
    )
    r.add_argument(
        "--control",
        metavar="IMAGE",
        help="control image for a bundle with a ControlNet (e.g. an edge map from `sdxs-edge canny`; resized with a warning if its size differs)",
    )
    r.add_argument(
        "--image",
        metavar="PATH",
        help="image-to-image, for a bundle with an encoder: start from this image (RGB, no alpha; resized with a warning if its size differs)",
    )
    r.add_argument(
        "--strength",
        type=cli_args.strength,
        metavar="S",
        help="image-to-image strength in (0, 1]: how much of the image is redrawn (default 0.8; needs --image)",
    )
    r.set_defaults(func=cmd_run)


def cmd_parity(args: argparse.Namespace) -> int:
    """Handler of `sdxs-edge parity`: print the table, write JSON, raise ParityError under the floors."""
    from runtimes.parity import check_floors, format_table, read_prompts, run_parity

    prompts = read_prompts(args.prompts) if args.prompts else None
    report = run_parity(
        args.bundle,
        args.runtime,
        reference=args.reference,
        prompts=prompts,
        seeds=args.seeds,
        runtime_options=runtime_options(args),
        json_out=args.json_out,
        check=False,
        rng=args.rng,
        width=args.width,
        height=args.height,
        batch=args.batch,
    )
    print(format_table(report))
    if args.json_out:
        print(f"wrote {args.json_out}")
    check_floors(report)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Handler of `sdxs-edge run`: generate one image and print load and per-component times."""
    import runtimes
    from runtimes.base import to_pil

    out = Path(args.out)
    image_format(out)  # a bad suffix fails before the bundle loads
    if args.strength is not None and args.image is None:
        raise SDXSError("--strength is for image-to-image: give --image PATH too")
    opts = runtime_options(args)
    if args.reference:
        opts["reference"] = args.reference
    t = time.perf_counter()
    with runtimes.load(args.bundle, args.runtime, **opts) as session:
        load_s = time.perf_counter() - t
        control = (
            cli_args.warnings_as_lines(session.prepare_control, args.control) if args.control is not None else None
        )
        prompts = [args.prompt] * (args.batch or session.batch)
        res = cli_args.warnings_as_lines(
            session.generate_arrays, prompts, args.seed, None, control, args.rng, args.image, args.strength,
            args.width, args.height,
        )  # fmt: skip
    images = to_pil(res.image)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        save_image(image, path)
    m = session.manifest
    print(
        f"bundle {args.bundle}  ({m['target']} {m['precision']}, {images[0].width}x{images[0].height}, batch {len(images)}) on {args.runtime}, seed {args.seed} ({args.rng} rng)"
        + (f", control {args.control}" if args.control else "")
        + (f", image {args.image} (strength {0.8 if args.strength is None else args.strength:g})" if args.image else "")
    )
    print(f"  load          {load_s * 1000:9.1f} ms")
    for k, v in res.timings.items():
        print(f"  {k:<13} {v * 1000:9.1f} ms")
    print(f"  total         {sum(res.timings.values()) * 1000:9.1f} ms  (excluding load)")
    print(f"wrote {', '.join(map(str, paths))}")
    return 0
