"""Control images for ControlNet: canny edges, loading and checking a control image, edge fidelity.

numpy and Pillow only, so the runtimes use the same code without PyTorch. A control image is what a
canny ControlNet reads: white edges on black, as float32 (B, 3, H, W) in [0, 1] (diffusers' ControlNet
convention), at the model's image resolution.

`canny` is the classic detector (Gaussian blur, Sobel gradients of the colour channel with the strongest
response, non-maximum suppression, double threshold with hysteresis) written in numpy, so training,
evaluation and deployment extract identical edges without OpenCV.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from sdxs_edge.errors import SDXSError

CONTROL_STREAM = 0xC0DE  # seed space of the scenes `prompt_controls` draws (apart from train / eval streams)
LOW, HIGH = 40.0, 80.0  # canny thresholds on the Sobel magnitude of a 0-255 image
IOU_TOLERANCE = 1  # pixels: edges count as matching within this distance (a 3x3 neighbourhood)
MAX_IMAGE_PIXELS = 8192 * 8192  # larger images are refused from their header, before any decoding


class ControlImageError(SDXSError):
    """A control image cannot be read, or cannot be brought to the model's size and mode."""


def _blur(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Separable Gaussian blur of (..., H, W) with edge replication."""
    r = max(1, int(round(2 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    pad = [(0, 0)] * (x.ndim - 2)
    xp = np.pad(x, pad + [(r, r), (0, 0)], mode="edge")
    x = sum(k[i] * xp[..., i : i + x.shape[-2], :] for i in range(len(k)))
    xp = np.pad(x, pad + [(0, 0), (r, r)], mode="edge")
    return sum(k[i] * xp[..., :, i : i + x.shape[-1]] for i in range(len(k)))


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xp = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    h, w = x.shape[-2:]

    def s(dy: int, dx: int) -> np.ndarray:
        return xp[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    return gx, gy


def _dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Binary dilation of (..., H, W) by a (2r+1) square."""
    out = mask.copy()
    h, w = mask.shape[-2:]
    mp = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(r, r), (r, r)])
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= mp[..., r + dy : r + dy + h, r + dx : r + dx + w]
    return out


def canny(images: np.ndarray, low: float = LOW, high: float = HIGH, sigma: float = 1.0) -> np.ndarray:
    """Canny edges of uint8 RGB images.

    Args:
        images: uint8 (H, W, 3) or (B, H, W, 3).
        low, high: hysteresis thresholds on the Sobel gradient magnitude (0-255 units).
        sigma: Gaussian blur before the gradients.

    Returns:
        uint8 edge maps, 255 on edges and 0 elsewhere: (H, W) or (B, H, W).
    """
    a = np.asarray(images)
    single = a.ndim == 3
    if single:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ControlImageError(
            f"canny expects RGB images (H, W, 3) or (B, H, W, 3), got shape {list(np.asarray(images).shape)}"
        )
    x = _blur(a.astype(np.float32).transpose(0, 3, 1, 2), sigma)  # (B, 3, H, W)
    gx, gy = _sobel(x)
    mag_c = np.hypot(gx, gy)
    best = mag_c.argmax(axis=1)[:, None]  # the colour channel with the strongest edge, per pixel
    mag = np.take_along_axis(mag_c, best, 1)[:, 0]
    gx = np.take_along_axis(gx, best, 1)[:, 0]
    gy = np.take_along_axis(gy, best, 1)[:, 0]
    # Non-maximum suppression along the gradient direction, quantized to 0/45/90/135 degrees.
    ang = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    q = np.select([(ang < 22.5) | (ang >= 157.5), ang < 67.5, ang < 112.5], [0, 1, 2], 3)
    h, w = mag.shape[-2:]
    mp = np.pad(mag, [(0, 0), (1, 1), (1, 1)])

    def nb(dy: int, dx: int) -> np.ndarray:
        return mp[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    offsets = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros_like(mag, dtype=bool)
    for d, (o1, o2) in offsets.items():
        keep |= (q == d) & (mag >= nb(*o1)) & (mag >= nb(*o2))
    mag = np.where(keep, mag, 0.0)
    strong, weak = mag >= high, mag >= low
    while True:  # hysteresis: weak pixels connected to strong ones
        grown = weak & _dilate(strong)
        if (grown == strong).all():
            break
        strong = grown
    out = strong.astype(np.uint8) * 255
    return out[0] if single else out


def edges_to_control(edges: np.ndarray) -> np.ndarray:
    """uint8 edge maps (H, W) or (B, H, W) -> float32 control images (B, 3, H, W) in [0, 1]."""
    e = np.asarray(edges)
    if e.ndim == 2:
        e = e[None]
    return np.repeat((e.astype(np.float32) / 255.0)[:, None], 3, axis=1)


def control_to_edges(control: np.ndarray) -> np.ndarray:
    """float32 control images (B, 3, H, W) in [0, 1] -> boolean edge masks (B, H, W)."""
    return np.asarray(control).mean(axis=1) >= 0.5


def edge_iou(edges_a: np.ndarray, edges_b: np.ndarray, tolerance: int = IOU_TOLERANCE) -> np.ndarray:
    """Per-image IoU of two sets of edge maps, each edge widened by `tolerance` pixels first.

    Thin edges a pixel apart would score 0 under exact IoU; a 1-pixel tolerance measures whether the
    generated image has its edges where the control asked for them.

    Args:
        edges_a, edges_b: boolean or uint8 (B, H, W) (or (H, W)) edge maps.
        tolerance: dilation radius in pixels (0 = exact).

    Returns:
        float64 (B,); 1.0 where both maps are empty.
    """
    a, b = np.asarray(edges_a) > 0, np.asarray(edges_b) > 0
    if a.ndim == 2:
        a, b = a[None], b[None]
    if a.shape != b.shape:
        raise SDXSError(f"edge maps differ in shape: {list(a.shape)} vs {list(b.shape)}")
    if tolerance:
        a, b = _dilate(a, tolerance), _dilate(b, tolerance)
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def open_image(path: str | os.PathLike, what: str = "image"):
    """Open and decode an image file, refusing one above MAX_IMAGE_PIXELS from its header first.

    Pillow reads only the header in `Image.open`; the size is checked before `load()` decodes anything,
    so a small file that claims huge dimensions costs no memory. A truncated or garbled file is a
    ControlImageError naming it.

    Args:
        path: the image file.
        what: how error messages name it ("control image", "image").
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # Pillow's own check, for formats whose frames it sizes later
    p = Path(path).expanduser()
    if not p.is_file():
        raise ControlImageError(f"{what} {p} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # sized below, with our message
            img = Image.open(p)
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            img.close()
            raise ControlImageError(f"{what} {p} is {w}x{h}; images above {MAX_IMAGE_PIXELS} pixels are refused")
        img.load()
    except ControlImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own header check (above twice the bound) came first
        raise ControlImageError(
            f"{what} {p} is above {2 * MAX_IMAGE_PIXELS} pixels; images above {MAX_IMAGE_PIXELS} pixels are refused"
        ) from None
    except Exception as e:  # Pillow's decoders raise OSError, ValueError, SyntaxError, EOFError, struct.error, ...
        raise ControlImageError(f"{what} {p} is not a readable image ({type(e).__name__})") from None
    return img


def load_control_image(source, resolution: int) -> np.ndarray:
    """A control image (path, PIL image or uint8 array) -> float32 (1, 3, resolution, resolution) in [0, 1].

    Grey and RGB images are used as they are; palette, 1-bit and 16-bit grey images are converted, and an
    alpha channel is dropped, each with a warning; an image of another size is resized (bilinear) with a
    warning. Refused with a ControlImageError: a missing or unreadable file, an empty image, an aspect
    ratio other than the model's (square), and modes that carry no picture (e.g. CMYK is converted, but a
    float32 "F" image outside [0, 255] is refused).

    Args:
        source: path to an image file, a PIL image, or a uint8 array (H, W) / (H, W, 3).
        resolution: the model's image side in pixels.
    """
    from PIL import Image

    if isinstance(source, (str, os.PathLike)):
        img = open_image(source, "control image")
        where = str(Path(source).expanduser())
    elif isinstance(source, np.ndarray):
        a = source
        if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3)):
            raise ControlImageError(
                f"control image array must be uint8 (H, W) or (H, W, 3), got {a.dtype}{list(a.shape)}"
            )
        img = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a)
        where = "control image array"
    elif isinstance(source, Image.Image):
        img, where = source, "control image"
    else:
        raise ControlImageError(
            f"control image must be a path, a PIL image or a uint8 array, got {type(source).__name__}"
        )
    w, h = img.size
    if w == 0 or h == 0:
        raise ControlImageError(f"{where} is empty ({w}x{h})")
    if abs(w / h - 1.0) > 0.02:
        raise ControlImageError(
            f"{where} is {w}x{h}; the model draws square {resolution}x{resolution} images, so the control image must be square (crop it first)"
        )
    if img.mode == "F":
        lo, hi = img.getextrema()
        if lo < 0 or hi > 255:
            raise ControlImageError(
                f"{where} is a float image with values in [{lo:g}, {hi:g}]; expected 0-255 (save the edge map as 8-bit)"
            )
    if img.mode not in ("L", "RGB"):
        if img.mode in ("RGBA", "LA", "P", "PA", "1", "I;16", "I", "F", "CMYK", "YCbCr", "LAB", "HSV"):
            warnings.warn(f"{where}: mode {img.mode} converted to RGB", stacklevel=2)
            if img.mode in ("I;16", "I"):
                a = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(a / max(a.max(), 1) * 255, 0, 255).astype(np.uint8))
            elif img.mode == "F":
                img = Image.fromarray(np.asarray(img).round().astype(np.uint8))
            img = img.convert("RGB")
        else:
            raise ControlImageError(
                f"{where} has image mode {img.mode!r}, which cannot be read as a control image (use 8-bit grey or RGB)"
            )
    if (w, h) != (resolution, resolution):
        warnings.warn(f"{where} is {w}x{h}; resized to {resolution}x{resolution}", stacklevel=2)
        img = img.resize((resolution, resolution), Image.BILINEAR)
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None])


def prompt_controls(prompts, resolution: int, seed: int = 0) -> np.ndarray:
    """Control images for prompts, for calibration, parity and examples: canny edges of a SHAPES-64 render
    of each prompt's scene. A SHAPES-64 caption pins the scene's attributes (radius and jitter are drawn);
    any other prompt gets a random SHAPES-64 scene, so every prompt has a plausible edge map. Renders are
    64x64; at another resolution the render is resized (bicubic) before the edges are taken.

    Args:
        prompts: the prompts (one control image each).
        resolution: image side in pixels.
        seed: scene seed; the same (prompts, resolution, seed) gives the same images.

    Returns:
        float32 (len(prompts), 3, resolution, resolution) in [0, 1], white edges on black.
    """
    from PIL import Image

    from sdxs_edge import shapes

    out = []
    for i, p in enumerate(prompts):
        rng = np.random.default_rng([CONTROL_STREAM, int(seed), i])
        try:
            fixed = shapes.parse_caption(p)
        except SDXSError:
            fixed = {}
        img = shapes.render(shapes.sample_scene(rng, **fixed))
        if resolution != img.shape[0]:
            img = np.asarray(Image.fromarray(img).resize((resolution, resolution), Image.BICUBIC))
        out.append(canny(img))
    return edges_to_control(np.stack(out))
