"""SHAPES-64: the procedural text-to-image world of ../shared/SHAPES-64.md, to the letter.

One shape on a plain 64x64 background; every image has known attributes, so prompt-following is
measured without CLIP. Rendering is anti-aliased by sampling a 4x grid per pixel and averaging.
Train and evaluation streams draw from disjoint seed spaces.

Beyond the spec, for style LoRAs (arXiv 2403.16627 Fig. 4): a scene has a `style`, "filled" (the spec's
world, the default everywhere) or "outline" (the same shape drawn as a 2 px outline: the shape minus the
shape shrunk by 2 px along every edge normal). Captions do not name the style; a style LoRA applies it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sdxs_edge.errors import SDXSError

SIZE = 64
SUPERSAMPLE = 4

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
COLORS = {
    "red": (230, 25, 25),
    "green": (25, 180, 25),
    "blue": (25, 60, 230),
    "yellow": (240, 220, 20),
    "magenta": (230, 30, 200),
    "cyan": (20, 210, 220),
    "orange": (245, 130, 20),
    "purple": (120, 40, 190),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (6.0, 8.0), "large": (12.0, 14.0)}
POSITIONS = {
    "top left": (14, 14),
    "top": (32, 14),
    "top right": (50, 14),
    "left": (14, 32),
    "center": (32, 32),
    "right": (50, 32),
    "bottom left": (14, 50),
    "bottom": (32, 50),
    "bottom right": (50, 50),
}
JITTER = 2.0
STYLES = ("filled", "outline")  # not a spec attribute: the style a style LoRA changes
OUTLINE_WIDTH = 2.0  # px

# Attribute name -> ordered value names; the order defines class indices for the evaluator.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": tuple(SIZES),
    "color": tuple(COLORS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}

CAPTION_RE = re.compile(
    r"a (?P<size>{}) (?P<color>{}) (?P<shape>{}) at the (?P<position>{}) on a (?P<background>{}) background".format(
        *("|".join(sorted(v, key=len, reverse=True)) for v in ATTRIBUTES.values())
    )
)

TRAIN_STREAM, EVAL_STREAM = 0x5EED, 0xE7A1  # disjoint seed spaces for train and evaluation


@dataclass(frozen=True)
class Scene:
    """One SHAPES-64 sample: attribute values plus the continuous draws (radius, centre)."""

    size: str
    color: str
    shape: str
    position: str
    background: str
    r: float
    cx: float
    cy: float
    style: str = "filled"

    @property
    def caption(self) -> str:
        return caption(self.size, self.color, self.shape, self.position, self.background)

    def labels(self) -> dict[str, int]:
        return {a: ATTRIBUTES[a].index(getattr(self, a)) for a in ATTRIBUTES}


def caption(size: str, color: str, shape: str, position: str, background: str) -> str:
    return f"a {size} {color} {shape} at the {position} on a {background} background"


def all_captions() -> list[str]:
    """The 1152 distinct prompts of the grammar."""
    return [
        caption(s, c, sh, p, b)
        for s in ATTRIBUTES["size"]
        for c in ATTRIBUTES["color"]
        for sh in SHAPES
        for p in ATTRIBUTES["position"]
        for b in ATTRIBUTES["background"]
    ]


def parse_caption(text: str) -> dict[str, str]:
    """Attribute values of a grammar caption; SDXSError if `text` is not one."""
    m = CAPTION_RE.fullmatch(text.strip())
    if m is None:
        raise SDXSError(f"not a SHAPES-64 caption: {text!r}")
    return m.groupdict()


def sample_scene(rng: np.random.Generator, style: str = "filled", **fixed: str) -> Scene:
    """Draw a scene uniformly over the attributes; `fixed` pins attribute values (e.g. from a caption)."""
    if style not in STYLES:
        raise SDXSError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    vals = {a: fixed.get(a) or ATTRIBUTES[a][rng.integers(len(ATTRIBUTES[a]))] for a in ATTRIBUTES}
    lo, hi = SIZES[vals["size"]]
    r = rng.uniform(lo, hi)
    px, py = POSITIONS[vals["position"]]
    cx = px + rng.uniform(-JITTER, JITTER)
    cy = py + rng.uniform(-JITTER, JITTER)
    return Scene(r=float(r), cx=float(cx), cy=float(cy), style=style, **vals)


_SUB = (np.arange(SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sample points in pixel units


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float, w: float = 0.0) -> np.ndarray:
    """The spec's geometry, with every edge moved inwards by `w` px along its normal (w = 0: the shape)."""
    if shape == "circle":
        return dx**2 + dy**2 <= (r - w) ** 2
    if shape == "square":
        return (np.abs(dx) <= r - w) & (np.abs(dy) <= r - w)
    if shape == "triangle":  # apex up; the slanted edges |dx| = (dy + r) / 2 have normals of length sqrt(5)/2
        return (dy >= -r + w) & (dy <= r - w) & (np.abs(dx) <= (dy + r) / 2 - w * np.sqrt(5) / 2)
    if shape == "cross":
        a = r / 3
        return ((np.abs(dx) <= r - w) & (np.abs(dy) <= a - w)) | ((np.abs(dy) <= r - w) & (np.abs(dx) <= a - w))
    raise SDXSError(f"unknown shape {shape!r}")


def coverage(scene: Scene) -> np.ndarray:
    """Anti-aliased shape coverage in [0, 1], float32 (64, 64). y grows downwards."""
    dx = _SUB[None, :] - scene.cx
    dy = _SUB[:, None] - scene.cy
    inside = _inside(scene.shape, dx, dy, scene.r)
    if scene.style == "outline":
        inside &= ~_inside(scene.shape, dx, dy, scene.r, OUTLINE_WIDTH)
    elif scene.style != "filled":
        raise SDXSError(f"unknown style {scene.style!r}; styles: {', '.join(STYLES)}")
    s = SUPERSAMPLE
    return inside.reshape(SIZE, s, SIZE, s).mean(axis=(1, 3)).astype(np.float32)


def _paint(scene: Scene, cov: np.ndarray) -> np.ndarray:
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    fg = np.array(COLORS[scene.color], np.float32)
    return np.round(bg * (1 - cov[..., None]) + fg * cov[..., None]).astype(np.uint8)


def render(scene: Scene) -> np.ndarray:
    """RGB uint8 (64, 64, 3)."""
    return _paint(scene, coverage(scene))


@dataclass
class Batch:
    images: np.ndarray  # uint8 (B, 64, 64, 3)
    masks: np.ndarray  # float32 (B, 64, 64) shape coverage
    captions: list[str]
    labels: dict[str, np.ndarray]  # attribute -> int64 (B,)
    styles: np.ndarray | None = None  # int64 (B,) index into STYLES


def make_batch(scenes: list[Scene]) -> Batch:
    covs = [coverage(s) for s in scenes]
    images = [_paint(s, cov) for s, cov in zip(scenes, covs)]
    per_scene = [s.labels() for s in scenes]
    labels = {a: np.array([l[a] for l in per_scene], np.int64) for a in ATTRIBUTES}
    styles = np.array([STYLES.index(s.style) for s in scenes], np.int64)
    return Batch(np.stack(images), np.stack(covs), [s.caption for s in scenes], labels, styles)


def _style_of(style: str, rng: np.random.Generator) -> str:
    """A style name, or "mixed": each scene filled or outline with equal odds."""
    if style == "mixed":
        return STYLES[rng.integers(len(STYLES))]
    return style


def train_stream(batch_size: int, seed: int = 0, start: int = 0, style: str = "filled") -> Iterator[Batch]:
    """Endless training batches; batch k depends only on (seed, k), so a resumed run continues exactly.

    Args:
        style: "filled" (the spec's world), "outline", or "mixed" (half and half, drawn per scene).
    """
    k = start
    while True:
        rng = np.random.default_rng([TRAIN_STREAM, seed, k])
        # The filled stream draws exactly as it always has (no extra draws), so older runs reproduce.
        yield make_batch([sample_scene(rng, style=_style_of(style, rng)) for _ in range(batch_size)])
        k += 1


def eval_scenes(n: int, seed: int = 0, style: str = "filled") -> list[Scene]:
    """A fixed evaluation set, disjoint in seed space from every training stream (`style` as in train_stream)."""
    rng = np.random.default_rng([EVAL_STREAM, seed])
    return [sample_scene(rng, style=_style_of(style, rng)) for _ in range(n)]


def to_tensor_range(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1] (the VAE's input range)."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)
