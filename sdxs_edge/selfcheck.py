"""The self-check reference a bundle records at conversion, so it can be checked without PyTorch.

The converter's check stage runs the PyTorch source model on fixed prompts and seeds
(`converters.calibration.PARITY_PROMPTS`, seeds from `PARITY_SEED0`); `record` writes those reference
images into the bundle as one PNG (`selfcheck.png`: every image of every sample side by side, in sample
order, then batch order) and returns the manifest's "selfcheck" entry: the file and its sha256, the
samples (each the prompts of one static batch and its seed), the noise generator, and the image floor of
the bundle's precision (`sdxs_edge.floors`). `sdxs-edge parity BUNDLE --reference none`
(`runtimes.selfcheck`) regenerates those samples on a runtime and compares.

PNG keeps uint8 pixels exactly and needs only Pillow, a core dependency. Numpy and Pillow only: no
PyTorch.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from sdxs_edge.atomic import write_atomic
from sdxs_edge.bundle import BundleError, selfcheck_path, sha256_path
from sdxs_edge.floors import FLOORS

FILE = "selfcheck.png"


def record(bundle: Path, images: np.ndarray, samples: list[dict], rng: str, precision: str, trained: bool) -> dict:
    """Write the reference images into `bundle` and return the manifest's "selfcheck" entry.

    Args:
        bundle: the bundle folder being written.
        images: uint8 (N, H, W, 3), N = samples x batch, in sample then batch order.
        samples: one {"prompts": [batch prompts], "seed": int} per sample.
        rng: the noise generator the seeds were drawn with (`runtimes.base.RNGS`).
        precision: the bundle's precision (its floor is recorded).
        trained: whether the image floor applies (random weights: reported only, as in `sdxs-edge parity`).
    """
    from PIL import Image

    strip = np.concatenate(list(np.asarray(images, np.uint8)), axis=1)  # (H, N * W, 3)
    buf = io.BytesIO()
    Image.fromarray(strip, "RGB").save(buf, format="PNG")
    write_atomic(bundle / FILE, buf.getvalue())
    return {
        "file": FILE,
        "sha256": sha256_path(bundle / FILE),
        "reference": "PyTorch float32 one-step images of the source model (uint8 RGB, side by side in sample then batch order)",
        "rng": rng,
        "samples": samples,
        "floor_image_psnr_db": FLOORS[precision].image_psnr_db,
        "enforced": bool(trained),
    }


def read_images(bundle: str | Path, manifest: dict) -> np.ndarray:
    """The recorded reference images, uint8 (N, H, W, 3); the file's sha256 is always checked.

    Args:
        bundle: the bundle folder.
        manifest: its validated manifest (with a "selfcheck" entry).
    """
    from PIL import Image

    rec = manifest["selfcheck"]
    path = selfcheck_path(Path(bundle), manifest, verify=True)
    res, batch = manifest["resolution"], manifest["components"]["unet"]["inputs"][0]["shape"][0]
    n = len(rec["samples"]) * batch
    try:
        with Image.open(path) as im:  # the size is read from the header, before any pixel is decoded
            if im.format != "PNG" or im.mode != "RGB" or im.size != (n * res, res):
                raise BundleError(
                    f"{bundle}: self-check file {rec['file']} is {im.format} {im.mode} {im.size[0]}x{im.size[1]}; expected PNG RGB {n * res}x{res} ({n} images of {res}px)"
                )
            strip = np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BundleError(f"{bundle}: self-check file {rec['file']} is not a readable PNG ({e})") from None
    return strip.reshape(res, n, res, 3).transpose(1, 0, 2, 3)
