"""Image-to-image strength sweep of the embedded SHAPES-64 model: a grid PNG and its evaluator figures.

    python -m benchmarks.img2img_strength [--model sdxs_edge/default_model] [--encoder VAE_DIR] [--out docs/img2img-strength]

Each grid row is one SHAPES-64 render (first column) re-generated with a caption that differs in every
attribute at the strengths of the header (`sdxs_edge.evaluate.strength_sweep`); the JSON has, per
strength, the fraction of attributes the evaluator reads as the new caption's and as the render's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STRENGTHS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def main(argv: list[str] | None = None) -> int:
    from sdxs_edge.evaluate import save_grid, strength_sweep
    from sdxs_edge.pipeline import SDXSPipeline

    p = argparse.ArgumentParser(prog="python -m benchmarks.img2img_strength", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sdxs_edge/default_model", help="model folder (run from the repository root)")
    p.add_argument(
        "--encoder", help="VAE folder to encode with instead of the model's tiny encoder (e.g. the teacher's vae/)"
    )
    p.add_argument("--n", type=int, default=8, help="source/target pairs (grid rows)")
    p.add_argument("--out", default="docs/img2img-strength", help="output stem: writes STEM.png and STEM.json")
    args = p.parse_args(argv)
    pipe = SDXSPipeline.load(args.model).attach_encoder(args.encoder)
    report, images = strength_sweep(pipe, STRENGTHS, n=args.n)
    report.update(
        model=args.model if args.encoder is None else f"{args.model} + encoder {args.encoder}",
        grid="rows: source render, then strengths " + ", ".join(map(str, STRENGTHS)),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(
        images.reshape(-1, *images.shape[2:]),
        out.with_suffix(".png"),
        cols=images.shape[1],
        limit=len(images) * images.shape[1],
    )
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
