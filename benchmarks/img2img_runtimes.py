"""Image-to-image on every runtime: a grid PNG of the embedded model's outputs and their PSNR against the
PyTorch pipeline.

    python -m benchmarks.img2img_runtimes [--bundles out/img2img] [--out docs/img2img-runtimes]

The embedded model is converted (once; reused when there) to ONNX and ExecuTorch fp32 and int8 bundles
with their encoder under --bundles. Each grid row is one SHAPES-64 render re-generated with a caption
that differs in every attribute, at one strength: the render, `SDXSPipeline(image=, strength=)`, then
`Session(image=, strength=)` on each (runtime, bundle) of `COLUMNS`, same seed. The JSON has every
image's uint8 PSNR against the pipeline's, and the SHAPES-64 strength sweep run on the executorch
runtime with the int8 bundle.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

MODEL = "sdxs_edge/default_model"
ROWS = ((0, 0.3), (1, 0.6), (2, 0.9))  # (pair index, strength)
SWEEP = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # strengths of the sweep on the ExecuTorch int8 bundle
COLUMNS = (  # (runtime, bundle target, precision)
    ("torch", "onnx", "fp32"),
    ("onnxruntime", "onnx", "fp32"),
    ("onnxruntime", "onnx", "int8"),
    ("executorch", "executorch", "fp32"),
    ("executorch", "executorch", "int8"),
    ("executorch-native", "executorch", "fp32"),
    ("executorch-native", "executorch", "int8"),
)


def bundles(root: Path, convert_missing: bool = True) -> dict[tuple[str, str], Path]:
    """The embedded model's bundles under `root` (TARGET-PRECISION), converted where missing (else left out)."""
    from converters import convert

    out = {}
    for target, precision in sorted({(t, p) for _, t, p in COLUMNS}):
        b = root / f"{target}-{precision}"
        if not (b / "manifest.json").is_file() and convert_missing:
            convert(MODEL, target, precision, b, progress=False, overwrite=b.exists())
        if (b / "manifest.json").is_file():
            out[(target, precision)] = b
    return out


def render_rows(paths: dict) -> tuple[list, dict]:
    """Per row: [render, pipeline, each column's image] as uint8 arrays; and each column's PSNR per row."""
    import numpy as np
    import torch

    import runtimes
    from sdxs_edge import shapes
    from sdxs_edge.evaluate import strength_pairs
    from sdxs_edge.metrics import psnr
    from sdxs_edge.pipeline import SDXSPipeline

    pipe = SDXSPipeline.load(MODEL)
    pairs = strength_pairs(max(i for i, _ in ROWS) + 1, 0)
    u8 = lambda a: (np.asarray(a) * 255).round().astype(np.uint8)
    columns = [c for c in COLUMNS if c[1:] in paths]
    rows, figures = [], {f"{r} {t}/{p}": [] for r, t, p in columns}
    for i, s in ROWS:
        src, caption = shapes.render(pairs[i][0]), pairs[i][1].caption
        ref = u8(
            pipe(caption, image=src, strength=s, generator=torch.Generator().manual_seed(i), output_type="np").images[0]
        )
        row = [src, ref]
        for runtime, target, precision in columns:
            with runtimes.load(paths[(target, precision)], runtime) as sess:
                img = u8(sess(caption, image=src, strength=s, seed=i, output_type="np").images[0])
            p = psnr(ref, img)
            figures[f"{runtime} {target}/{precision}"].append(None if math.isinf(p) else round(float(p), 2))
            row.append(img)
        rows.append(row)
    return rows, figures


def sweep_on_a_runtime(bundle: Path) -> dict:
    """The SHAPES-64 strength sweep (`sdxs_edge.evaluate.strength_sweep`, 8 pairs) on the executorch
    runtime: the share of attributes the evaluator reads as the new caption's / the render's."""
    import runtimes
    from sdxs_edge.evaluate import strength_sweep

    with runtimes.load(bundle, "executorch") as sess:
        rep, _ = strength_sweep(sess, SWEEP, n=8)
    return rep


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from sdxs_edge import cpu
    from sdxs_edge.atomic import write_atomic
    from sdxs_edge.evaluate import save_grid

    p = argparse.ArgumentParser(prog="python -m benchmarks.img2img_runtimes", description=__doc__.split("\n")[0])
    p.add_argument("--bundles", default="out/img2img", help="folder for the converted bundles")
    p.add_argument("--out", default="docs/img2img-runtimes", help="output stem: writes STEM.png and STEM.json")
    p.add_argument("--no-convert", action="store_true", help="leave out the columns whose bundle is not there")
    args = p.parse_args(argv)
    paths = bundles(Path(args.bundles), not args.no_convert)
    rows, figures = render_rows(paths)
    sweep = sweep_on_a_runtime(paths[("executorch", "int8")]) if ("executorch", "int8") in paths else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images = np.stack([np.stack(r) for r in rows])
    save_grid(
        images.reshape(-1, *images.shape[2:]), out.with_suffix(".png"), cols=images.shape[1], limit=images[0].size
    )
    report = {
        "model": MODEL,
        "command": "python -m benchmarks.img2img_runtimes",
        "grid": "rows: (pair, strength) "
        + ", ".join(f"({i}, {s})" for i, s in ROWS)
        + "; columns: render, SDXSPipeline, then "
        + ", ".join(figures),
        "pairs": "sdxs_edge.evaluate.strength_pairs(3, 0); seed = pair index",
        "psnr_db_vs_pipeline": figures,
        "psnr_null_means": "identical uint8 images",
        "strength_sweep_executorch_int8": sweep,
        "cpu_class": cpu.host_class(),
    }
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
