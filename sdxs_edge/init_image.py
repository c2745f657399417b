"""The input image of image-to-image: a path, PIL image or array -> float32 (1, 3, H, W) in [-1, 1].

numpy and Pillow only, so the bundle runtimes use it without PyTorch. Refused with an InitImageError:
a missing file, a file that is not an image, an empty image, an image with an alpha channel (what the
transparent pixels should be is the user's call: flatten it first), and arrays that are not uint8
(H, W, 3) or float (1, 3, H, W) in [-1, 1]. Grey and palette images are converted to RGB, and an image
of another size is resized (bicubic), each with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from sdxs_edge.errors import SDXSError


class InitImageError(SDXSError):
    """An image-to-image input that cannot be used."""


def load_init_image(source, height: int, width: int) -> np.ndarray:
    """An image-to-image input as float32 (1, 3, height, width) in [-1, 1].

    Args:
        source: a path, a PIL image, a uint8 array (H, W, 3), or a float array (1, 3, height, width) in
            [-1, 1] (used as it is).
        height: the image height the model draws.
        width: the image width the model draws.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, np.ndarray) and source.dtype.kind == "f":
        a = source
        if a.shape != (1, 3, height, width) or not np.isfinite(a).all() or a.min() < -1 or a.max() > 1:
            raise InitImageError(
                f"image array: expected float (1, 3, {height}, {width}) in [-1, 1], got {a.dtype}{list(a.shape)}"
            )
        return a.astype(np.float32)
    if isinstance(source, (str, os.PathLike)):
        p = Path(source).expanduser()
        if not p.is_file():
            raise InitImageError(f"image {p} does not exist")
        try:
            img = Image.open(p)
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise InitImageError(f"image {p} is not a readable image ({type(e).__name__})") from None
        where = str(p)
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise InitImageError(
                f"image array must be uint8 (H, W, 3) or float (1, 3, H, W), got {source.dtype}{list(source.shape)}"
            )
        img, where = Image.fromarray(source), "image array"
    elif isinstance(source, Image.Image):
        img, where = source, "image"
    else:
        raise InitImageError(f"image must be a path, a PIL image or an array, got {type(source).__name__}")
    w, h = img.size
    if w == 0 or h == 0:
        raise InitImageError(f"{where} is empty ({w}x{h})")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        raise InitImageError(f"{where} has an alpha channel ({img.mode}); flatten it onto a background first")
    if img.mode != "RGB":
        warnings.warn(f"{where} is {img.mode}; converted to RGB", stacklevel=2)
        img = img.convert("RGB")
    if (w, h) != (width, height):
        warnings.warn(f"{where} is {w}x{h}; resized to {width}x{height}", stacklevel=2)
        img = img.resize((width, height), Image.BICUBIC)
    a = np.asarray(img, np.float32) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None])
