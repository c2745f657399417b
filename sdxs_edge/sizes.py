"""Image sizes and batch bounds of one bundle: parsing `--sizes`, the manifest's record, the shapes at a size.

A bundle converted with `--sizes 64x64,96x64` or `--max-batch 4` runs at each listed size (width x
height) and any batch from 1 to its bound. The manifest keeps the components' tensor shapes at the
first size and batch 1 (the default a runtime draws), plus

    "sizes": [[64, 64], [96, 64]]     every (width, height) the bundle takes; the first is the default
    "max_batch": 4                    the largest batch (1 .. max_batch; absent: the static "batch")
    "size_multiple": 32               width and height are multiples of this (8 x the U-Net's downsampling)

Every 4-D tensor (latents, images, ControlNet residuals) scales its last two dimensions with the image
size; the first dimension of every tensor is the batch. A bundle without these keys takes its one size
and static batch, as before. Numpy and the standard library only: runtimes use it without PyTorch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sdxs_edge.errors import SDXSError

SIZE_STEP = 64  # the step of --min-size .. --max-size
_SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


class SizeError(SDXSError):
    """A size or batch a bundle (or a conversion) does not take."""


def parse_size(text: str) -> tuple[int, int]:
    """ "WxH" -> (width, height)."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise SizeError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 512x768)")
    return int(m.group(1)), int(m.group(2))


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """ "512x512,512x768" -> ((512, 512), (512, 768)); an empty list is an error."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise SizeError("the size list is empty; give WIDTHxHEIGHT[,WIDTHxHEIGHT...] (e.g. 512x512,512x768)")
    return tuple(parse_size(p) for p in parts)


def size_range(lo: str, hi: str, step: int = SIZE_STEP) -> tuple[tuple[int, int], ...]:
    """Every (width, height) from `lo` to `hi` ("WxH" each) in steps of `step` pixels, `lo` first."""
    (w0, h0), (w1, h1) = parse_size(lo), parse_size(hi)
    if w1 < w0 or h1 < h0:
        raise SizeError(f"--max-size {w1}x{h1} is below --min-size {w0}x{h0}")
    return tuple((w, h) for w in range(w0, w1 + 1, step) for h in range(h0, h1 + 1, step))


def fmt(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def check_sizes(sizes: Sequence[Sequence[int]], multiple: int = 8) -> tuple[tuple[int, int], ...]:
    """Sizes as (width, height) tuples: positive multiples of `multiple`, none twice, at least one."""
    out = tuple((int(w), int(h)) for w, h in sizes)
    if not out:
        raise SizeError("the size list is empty; give at least one WIDTHxHEIGHT")
    for w, h in out:
        if w < multiple or h < multiple or w % multiple or h % multiple:
            raise SizeError(f"size {w}x{h}: width and height must be positive multiples of {multiple}")
    if len(set(out)) != len(out):
        raise SizeError(f"a size is listed twice: {', '.join(map(fmt, out))}")
    return out


def bundle_sizes(manifest: dict) -> tuple[tuple[int, int], ...]:
    """The (width, height) sizes a bundle takes; the first is its default (the declared shapes')."""
    if "sizes" in manifest:
        return tuple((int(w), int(h)) for w, h in manifest["sizes"])
    r = int(manifest["resolution"])
    return ((r, r),)


def max_batch(manifest: dict) -> int:
    """The largest batch a bundle takes (its static batch when it records no bound)."""
    return int(manifest.get("max_batch", manifest.get("batch", 1)))


def batches(manifest: dict) -> range:
    """The batches a bundle takes: 1 .. max_batch for a dynamic batch, else its static batch only."""
    if "max_batch" in manifest:
        return range(1, int(manifest["max_batch"]) + 1)
    b = int(manifest.get("batch", 1))
    return range(b, b + 1)


def check_request(manifest: dict, width: int, height: int, batch: int) -> None:
    """One line naming what the bundle takes when (width, height, batch) is not one of them."""
    sizes = bundle_sizes(manifest)
    mult = int(manifest.get("size_multiple", 8))
    if width % 8 or height % 8 or width % mult or height % mult:
        raise SizeError(f"size {width}x{height}: width and height must be multiples of {mult} for this bundle")
    if (width, height) not in sizes:
        raise SizeError(f"this bundle has no size {width}x{height}; it takes {', '.join(map(fmt, sizes))}")
    allowed = batches(manifest)
    if batch not in allowed:
        bound = f"batch 1 to {allowed[-1]}" if len(allowed) > 1 else f"batch {allowed[0]} only"
        raise SizeError(f"batch {batch} is not one this bundle takes ({bound}; convert with --max-batch N)")


def shape_at(shape: Sequence[int], base: tuple[int, int], size: tuple[int, int], batch: int) -> tuple[int, ...]:
    """A declared tensor shape (at image size `base`, (width, height)) at `size` and `batch`: the batch
    first, and a 4-D tensor's last two dimensions scaled with the image height and width."""
    out = [int(batch), *(int(d) for d in shape[1:])]
    if len(out) == 4:
        (bw, bh), (w, h) = base, size
        out[2], out[3] = out[2] * h // bh, out[3] * w // bw
    return tuple(out)


def size_of(shape: Sequence[int], declared: Sequence[int], base: tuple[int, int]) -> tuple[int, int] | None:
    """The image (width, height) a 4-D tensor of `shape` implies, given its `declared` shape at `base`;
    None when it implies no whole size."""
    if len(shape) != 4 or len(declared) != 4:
        return None
    (bw, bh), (dh, dw) = base, declared[2:4]
    if (shape[2] * bh) % dh or (shape[3] * bw) % dw:
        return None
    return shape[3] * bw // dw, shape[2] * bh // dh


def method_name(sizes: Sequence[Sequence[int]], size: Sequence[int], base: str = "forward") -> str:
    """The ExecuTorch method of one image size: `base` at the default (first) size, so a runner that knows
    one size runs it as before, and "<base>_<W>x<H>" at the others."""
    if not sizes or tuple(size) == tuple(sizes[0]):
        return base
    return f"{base}_{size[0]}x{size[1]}"
