"""The image writer: a PIL image to .png, .jpg or .webp, replaced atomically (a failed write leaves no file)."""

from __future__ import annotations

import os
from pathlib import Path

from sdxs_edge.atomic import atomic_file
from sdxs_edge.errors import SDXSError

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_format(out: str | os.PathLike) -> str:
    """PIL's format name for an output path; SDXSError for any other suffix (check before generating)."""
    out = Path(out)
    if out.suffix.lower() not in IMAGE_FORMATS:
        raise SDXSError(f"--out must end in .png, .jpg or .webp, got {out.name!r}")
    return IMAGE_FORMATS[out.suffix.lower()]


def save_image(image, out: str | os.PathLike) -> Path:
    """Write a PIL image in the format its suffix names; returns the path."""
    out = Path(out)
    fmt = image_format(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        image.save(tmp, format=fmt)
    return out
