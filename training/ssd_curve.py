"""Score the U-Net checkpoints of a one-step training stage on SHAPES-64, as they appear: the quality
curve of a long score distillation, and the checkpoint to keep.

    python -m training.ssd_curve OUT/ssd --base sdxs_edge/default_model --watch 60   # score while it trains
    python -m training.ssd_curve OUT/ssd --base sdxs_edge/default_model --save 1200 models/candidates/NAME

Each checkpoint's U-Net (OUT/ssd/checkpoints/step-N/unet.safetensors) goes into the `--base` one-step
model (its text encoder, tiny decoder and scheduler) and is scored like `sdxs-edge eval` (fixed evaluation
prompts, one step, no guidance); one JSON line per step is appended to OUT/ssd/curve.jsonl and the U-Net
is kept as OUT/ssd/scored/step-N (the stage keeps only its last checkpoints). `--save STEP FOLDER` writes
the base model with a scored step's U-Net as a diffusers folder (fp16 weights, as the embedded model).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

SCORES = ("all_correct", "size", "color", "shape", "position", "background", "fid_shapes")


def with_unet(base, unet_folder: Path):
    """A copy of the one-step pipeline `base` whose U-Net weights come from `unet_folder`
    (`unet.safetensors`, strict: every tensor of the base U-Net's layout, no other)."""
    from safetensors.torch import load_file

    from sdxs_edge.errors import SDXSError

    pipe = copy.copy(base)
    pipe.c = copy.copy(base.c)
    pipe.c.unet = copy.deepcopy(base.c.unet)
    try:
        pipe.c.unet.load_state_dict(load_file(str(unet_folder / "unet.safetensors")))
    except RuntimeError as e:
        raise SDXSError(f"{unet_folder} holds no U-Net of the base model's layout ({str(e).splitlines()[0]})") from e
    return pipe


def score(pipe, n: int) -> dict:
    """`sdxs-edge eval`'s scores of a one-step pipeline (n fixed evaluation prompts, seed 0)."""
    from sdxs_edge.evaluate import EvalSettings, evaluate_pipeline

    rep, _ = evaluate_pipeline(pipe, EvalSettings(n=n, steps=1, guidance=0.0), progress=False)
    return {k: round(float(rep[k]), 4) for k in SCORES}


def scored_steps(root: Path) -> set[int]:
    f = root / "curve.jsonl"
    return {json.loads(line)["step"] for line in f.read_text().splitlines() if line} if f.is_file() else set()


def score_new_checkpoints(root: Path, base, n: int) -> list[dict]:
    """Score every complete checkpoint under `root/checkpoints` not yet in `root/curve.jsonl`; append
    their lines and keep their U-Nets under `root/scored/`."""
    import shutil

    from sdxs_edge.atomic import atomic_dir

    done, rows = scored_steps(root), []
    for ckpt in sorted((root / "checkpoints").glob("step-*")):  # none yet: a stage that has just started
        step = int(ckpt.name.split("-")[1])
        if step in done or not (ckpt / "state.json").is_file():
            continue
        keep = root / "scored" / ckpt.name
        with atomic_dir(keep, overwrite=True) as tmp:  # the stage may delete the checkpoint at any moment
            shutil.copy2(ckpt / "unet.safetensors", tmp / "unet.safetensors")
        row = {"step": step, **score(with_unet(base, keep), n)}
        with (root / "curve.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="a stage folder holding checkpoints/ (e.g. OUT/ssd)")
    ap.add_argument("--base", required=True, help="one-step model folder whose U-Net the checkpoints replace")
    ap.add_argument("--n", type=int, default=512, help="evaluation prompts")
    ap.add_argument("--watch", type=float, default=0, help="poll every this many seconds until --until")
    ap.add_argument("--until", type=int, default=0, help="with --watch: stop once this step is scored")
    ap.add_argument("--save", nargs=2, metavar=("STEP", "FOLDER"), help="write a scored step as a model folder")
    ap.add_argument("--name", default="sdxs-shapes one-step", help="with --save: the model's name")
    ap.add_argument("--threads", type=int, default=1)
    return ap


def main(argv: list[str] | None = None) -> int:
    from sdxs_edge.errors import SDXSError
    from sdxs_edge.pipeline import SDXSPipeline

    a = _parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    if not a.watch and not (a.root / "checkpoints").is_dir() and not (a.root / "scored").is_dir():
        raise SDXSError(f"{a.root} holds no checkpoints/ (a training stage folder such as OUT/ssd)")
    base = SDXSPipeline.load(a.base)
    if a.save:
        unet = a.root / "scored" / f"step-{int(a.save[0]):07d}"
        if not (unet / "unet.safetensors").is_file():
            raise SDXSError(f"step {a.save[0]} was not scored under {a.root / 'scored'}")
        pipe = with_unet(base, unet)
        pipe.name = a.name
        print(pipe.save_pretrained(a.save[1], dtype=torch.float16))
        return 0
    while True:
        for row in score_new_checkpoints(a.root, base, a.n):
            print(json.dumps(row), flush=True)
        if not a.watch or (a.until and a.until in scored_steps(a.root)):
            return 0
        time.sleep(a.watch)


if __name__ == "__main__":
    raise SystemExit(main())
