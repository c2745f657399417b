"""Train the SHAPES-64 attribute classifier (the evaluator) on rendered images.

Generated images are blurrier and noisier than renders, so training adds mild Gaussian noise and blur;
without it the classifier would judge the renderer's exact pixels rather than what a picture shows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sdxs_edge import shapes
from sdxs_edge.evaluate import ClassifierConfig, Evaluator, ShapesClassifier, accuracy_report
from training.loop import LoopConfig, run_loop


@dataclass(frozen=True)
class EvaluatorConfig:
    """Args:
    steps: optimizer steps.
    batch: images per step.
    lr: AdamW learning rate (cosine to 0).
    noise: max std of the added Gaussian noise (in [-1, 1] units).
    seed: data seed (train stream; evaluation scenes are disjoint).
    style: render style of the training stream: "filled" (the main evaluator) or "mixed" (adds a style
        head: the style evaluator for outline LoRAs).
    """

    steps: int = 600
    batch: int = 64
    lr: float = 2e-3
    noise: float = 0.15
    seed: int = 7
    style: str = "filled"


def _augment(x: torch.Tensor, noise: float, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    blur = torch.rand(b, generator=g) < 0.5
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        x = torch.where(blur.view(-1, 1, 1, 1), F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3), x)
    std = torch.rand(b, 1, 1, 1, generator=g) * noise
    return (x + std * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def train_evaluator(cfg: EvaluatorConfig, out: str | Path, dest: str | Path | None = None) -> dict:
    """Train, then write weights + config to `dest` (default: out/evaluator). Returns held-out accuracy."""
    out = Path(out)
    torch.manual_seed(cfg.seed)
    ccfg = ClassifierConfig(style=cfg.style != "filled")
    model = ShapesClassifier(ccfg).train()
    opt = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=1e-4)
    sched = lambda k: 0.5 * (1 + math.cos(math.pi * k / cfg.steps))

    def step(k: int) -> dict:
        for gr in opt.param_groups:
            gr["lr"] = cfg.lr * sched(k)
        b = next(shapes.train_stream(cfg.batch, seed=cfg.seed, start=k, style=cfg.style))
        g = torch.Generator().manual_seed(k)
        x = _augment(torch.from_numpy(shapes.to_tensor_range(b.images)), cfg.noise, g)
        logits = model(x)
        labels = {**b.labels, "style": b.styles}
        loss = sum(F.cross_entropy(logits[a], torch.from_numpy(labels[a])) for a in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    run_loop(
        "evaluator", out, LoopConfig(cfg.steps, log_every=50, ckpt_every=200), step, {"classifier": model}, {"opt": opt}
    )
    ev = Evaluator(model.eval(), {})
    held = shapes.make_batch(shapes.eval_scenes(2048, seed=99, style=cfg.style))
    pred = ev.classify(held.images)
    acc = accuracy_report(pred, held.labels)
    if ccfg.style:
        acc["style"] = float((pred["style"] == held.styles).mean())
    dest = Path(dest) if dest else out / "evaluator"
    from safetensors.torch import save_file

    from sdxs_edge.atomic import atomic_dir

    meta = {"config": asdict(ccfg), "training": asdict(cfg), "heldout_accuracy": acc}
    with atomic_dir(dest, overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    return acc
