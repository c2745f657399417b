"""SHAPES-64 evaluator: an attribute classifier trained on rendered images, and the metrics built on it.

Prompt-following is measured without CLIP (../shared/SHAPES-64.md, "What to measure"):
  - per-attribute accuracy of generated images against their prompts, and the all-correct rate;
  - FID-shapes: Frechet distance between generated and rendered images in the classifier's
    penultimate features, reported with the classifier's own accuracy on rendered images.
The committed classifier lives in `sdxs_edge/evaluator/` (safetensors + JSON); `training/evaluator.py`
trains it. `sdxs_edge/evaluator-style/` is a second classifier, trained on filled and outline renders
alike, with one more head, "style" (filled / outline): it scores style LoRAs (`STYLE_EVALUATOR_DIR`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdxs_edge import shapes
from sdxs_edge.errors import ModelLoadError, SDXSError

EVALUATOR_DIR = Path(__file__).parent / "evaluator"
STYLE_EVALUATOR_DIR = Path(__file__).parent / "evaluator-style"


@dataclass(frozen=True)
class ClassifierConfig:
    """Args:
    width: channels of the first conv stage (doubled at each of 3 stages).
    feature_dim: penultimate feature size (the FID-shapes space).
    """

    width: int = 16
    feature_dim: int = 128
    style: bool = False  # add a "style" head (shapes.STYLES: filled / outline)


class ShapesClassifier(nn.Module):
    """Small CNN with one head per SHAPES-64 attribute; input float (B, 3, 64, 64) in [-1, 1]."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        w = cfg.width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
            )

        # CoordConv-style x/y channels make position trivially readable.
        stem = nn.Sequential(nn.Conv2d(5, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU())
        self.body = nn.Sequential(
            stem, nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w), nn.MaxPool2d(2)
        )
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 8 * 8, cfg.feature_dim), nn.SiLU())
        heads = {**shapes.ATTRIBUTES, **({"style": shapes.STYLES} if cfg.style else {})}
        self.heads = nn.ModuleDict({a: nn.Linear(cfg.feature_dim, len(v)) for a, v in heads.items()})
        coords = torch.linspace(-1, 1, shapes.SIZE)
        self.register_buffer(
            "coords", torch.stack(torch.meshgrid(coords, coords, indexing="ij"))[None], persistent=False
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], 1)
        return self.proj(self.body(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {a: h(f) for a, h in self.heads.items()}


class Evaluator:
    """A loaded classifier with batched, no-grad helpers over uint8 NHWC images."""

    def __init__(self, model: ShapesClassifier, meta: dict):
        self.model = model.eval()
        self.meta = meta

    @classmethod
    def load(cls, folder: str | Path = EVALUATOR_DIR) -> Evaluator:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "model.safetensors").is_file():
            raise ModelLoadError(f"no evaluator weights at {folder} (train one with `sdxs-edge train evaluator`)")
        meta = json.loads((folder / "config.json").read_text())
        model = ShapesClassifier(ClassifierConfig(**meta["config"]))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return cls(model, meta)

    @torch.no_grad()
    def _run(self, images: np.ndarray, fn) -> list:
        out = []
        for i in range(0, len(images), 256):
            out.append(fn(torch.from_numpy(shapes.to_tensor_range(images[i : i + 256]))))
        return out

    @property
    def has_style(self) -> bool:
        return "style" in self.model.heads

    def classify(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Predicted class index per attribute (and "style", for the style evaluator) for uint8 (B, 64, 64, 3) images."""
        parts = self._run(images, lambda x: {a: v.argmax(1) for a, v in self.model(x).items()})
        return {a: torch.cat([p[a] for p in parts]).numpy() for a in self.model.heads}

    def features(self, images: np.ndarray) -> np.ndarray:
        return torch.cat(self._run(images, self.model.features)).double().numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # tr sqrt(s1 s2) = tr sqrt(A s2 A) with A = s1^(1/2): a symmetric eigenproblem, no matrix sqrtm.
    w, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(a @ s2 @ a), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def accuracy_report(pred: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-attribute accuracy and the all-correct rate."""
    correct = {a: pred[a] == labels[a] for a in shapes.ATTRIBUTES}
    rep = {a: float(c.mean()) for a, c in correct.items()}
    rep["all_correct"] = float(np.logical_and.reduce(list(correct.values())).mean())
    return rep


def read_prompt_file(path: str | Path) -> list[str]:
    """Captions, one per line; every line must be a SHAPES-64 caption (the first bad line is named)."""
    path = Path(path)
    try:
        lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise SDXSError(f"{path} is not a UTF-8 text file") from None
    lines = [l for l in lines if l]
    if not lines:
        raise SDXSError(f"{path} has no captions")
    for i, l in enumerate(lines, 1):
        try:
            shapes.parse_caption(l)
        except SDXSError:
            raise SDXSError(f"{path}:{i}: not a SHAPES-64 caption: {l[:80]!r}") from None
    return lines


@dataclass(frozen=True)
class EvalSettings:
    """Args:
    n: number of evaluation prompts (fixed evaluation scenes, disjoint from training).
    steps: sampling steps (None = the model's default).
    guidance: guidance scale (None = the model's default).
    batch: images per generation batch.
    seed: evaluation-set and noise seed.
    """

    n: int = 512
    steps: int | None = None
    guidance: float | None = None
    batch: int = 64
    seed: int = 0


def evaluate_pipeline(
    pipe,
    settings: EvalSettings,
    evaluator: Evaluator | None = None,
    prompts: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[dict, np.ndarray]:
    """Generate for the evaluation prompts and score them. Returns (report, generated uint8 images)."""
    from tqdm.auto import tqdm

    ev = evaluator or Evaluator.load()
    if prompts is None:
        scenes = shapes.eval_scenes(settings.n, settings.seed)
    else:
        rng = np.random.default_rng([shapes.EVAL_STREAM, settings.seed, 1])
        scenes = [shapes.sample_scene(rng, **shapes.parse_caption(p)) for p in prompts]
    ref = shapes.make_batch(scenes)
    gen, t0 = [], time.perf_counter()
    for i in tqdm(range(0, len(scenes), settings.batch), desc="generate", disable=not progress):
        caps = ref.captions[i : i + settings.batch]
        out = pipe.generate(
            caps, seed=settings.seed * 100_003 + i, steps=settings.steps, guidance=settings.guidance, output="tensor"
        ).images
        gen.append(((out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))
    seconds = time.perf_counter() - t0
    images = np.concatenate(gen)
    rep = accuracy_report(ev.classify(images), ref.labels)
    rep["fid_shapes"] = frechet_distance(ev.features(images), ev.features(ref.images))
    rep["classifier_accuracy_on_rendered"] = accuracy_report(ev.classify(ref.images), ref.labels)["all_correct"]
    rep["images_per_second"] = len(images) / seconds
    rep["n"] = len(images)
    rep["steps"] = settings.steps if settings.steps is not None else pipe.default_steps
    rep["guidance"] = settings.guidance if settings.guidance is not None else pipe.default_guidance
    return rep, images


def save_grid(images: np.ndarray, path: str | Path, cols: int = 16, limit: int = 128) -> Path:
    """Write the first `limit` images as a PNG grid (atomically)."""
    from PIL import Image

    imgs = images[:limit]
    rows = (len(imgs) + cols - 1) // cols
    h, w = imgs.shape[1:3]
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 128, np.uint8)
    for k, im in enumerate(imgs):
        r, c = divmod(k, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = im
    from sdxs_edge.atomic import atomic_file

    path = Path(path)
    with atomic_file(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path


def format_report(rep: dict) -> str:
    lines = [f"{'metric':<34}{'value':>10}"]
    for a in shapes.ATTRIBUTES:
        lines.append(f"{'accuracy ' + a:<34}{rep[a]:>10.3f}")
    lines.append(f"{'all-correct rate':<34}{rep['all_correct']:>10.3f}")
    lines.append(f"{'FID-shapes':<34}{rep['fid_shapes']:>10.3f}")
    lines.append(f"{'classifier accuracy (rendered)':<34}{rep['classifier_accuracy_on_rendered']:>10.3f}")
    lines.append(f"{'images / second':<34}{rep['images_per_second']:>10.2f}")
    return "\n".join(lines)


def strength_pairs(n: int, seed: int = 0) -> list[tuple[shapes.Scene, shapes.Scene]]:
    """`n` (source scene, target scene) pairs that differ in every attribute, for image-to-image sweeps."""
    rng = np.random.default_rng([shapes.EVAL_STREAM, seed, 2])
    pairs = []
    while len(pairs) < n:
        a = shapes.sample_scene(rng)
        fixed = {
            k: v[(v.index(getattr(a, k)) + 1 + int(rng.integers(len(v) - 1))) % len(v)]
            for k, v in shapes.ATTRIBUTES.items()
        }
        pairs.append((a, shapes.sample_scene(rng, **fixed)))
    return pairs


def _noise_kw(pipe, seed: int) -> dict:
    """The noise argument of a call: a torch generator for the pipeline, the seed for a bundle session
    (whose default rng draws the same torch.randn stream)."""
    if hasattr(pipe, "specs"):
        return {"seed": seed}
    return {"generator": torch.Generator().manual_seed(seed)}


def strength_sweep(
    pipe, strengths: Sequence[float], n: int = 8, seed: int = 0, evaluator: Evaluator | None = None
) -> tuple[dict, np.ndarray]:
    """Image-to-image on SHAPES-64: render a source caption, re-generate it with a target caption that
    differs in every attribute, at each strength; the evaluator says how many attributes moved.

    Args:
        pipe: an `SDXSPipeline` (its `__call__` with image= and strength=), or a bundle session with an
            encoder (`runtimes.base.Session.__call__`, seed= for the same torch noise stream).
        strengths: strengths in (0, 1].
        n: source/target pairs.
        seed: pair and noise seed.
        evaluator: the SHAPES-64 classifier (default: the committed one).

    Returns:
        ({"strengths", "target_rate", "source_rate"}: per strength the fraction of the 5 x n attributes
        the evaluator reads as the target's / the source's), and uint8 images (n, 1 + len(strengths),
        64, 64, 3): each source render, then its re-generations.
    """
    ev = evaluator or Evaluator.load()
    pairs = strength_pairs(n, seed)
    src = np.stack([shapes.render(a) for a, _ in pairs])
    src_labels = shapes.make_batch([a for a, _ in pairs]).labels
    tgt_labels = shapes.make_batch([b for _, b in pairs]).labels
    rows, target_rate, source_rate = [src], [], []
    for s in strengths:
        out = np.concatenate(
            [
                pipe(b.caption, image=src[i], strength=s, output_type="np", **_noise_kw(pipe, seed * 1000 + i)).images
                for i, (_, b) in enumerate(pairs)
            ]
        )
        img = (out * 255).round().astype(np.uint8)
        pred = ev.classify(img)
        target_rate.append(float(np.mean([pred[k] == tgt_labels[k] for k in shapes.ATTRIBUTES])))
        source_rate.append(float(np.mean([pred[k] == src_labels[k] for k in shapes.ATTRIBUTES])))
        rows.append(img)
    report = {
        "strengths": [float(s) for s in strengths],
        "target_rate": target_rate,
        "source_rate": source_rate,
        "n": n,
        "seed": seed,
    }
    return report, np.stack(rows, axis=1)
