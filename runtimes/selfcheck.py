"""`sdxs-edge parity BUNDLE --reference none`: a bundle on a runtime against the PyTorch images its
conversion recorded (`sdxs_edge.selfcheck`), without PyTorch.

The runtime regenerates each recorded sample (its prompts, its seed, the recorded noise generator; for a
bundle with a ControlNet the control images `converters.calibration` made from the prompts and seed) and
the images are compared by PSNR (uint8) with the image floor of the bundle's precision
(`sdxs_edge.floors`), enforced for trained models as `sdxs-edge parity` enforces it. The conversion's
own end-to-end PSNR on the same samples (the manifest's "parity.end_to_end") is shown beside it.

What it does not measure, and `sdxs-edge parity` with PyTorch does: per-component SNR, other prompts and
seeds, and the SHAPES-64 all-correct rates.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

import runtimes
from runtimes.base import to_uint8
from sdxs_edge import cpu, metrics, selfcheck
from sdxs_edge.bundle import load_manifest
from sdxs_edge.errors import SDXSError
from sdxs_edge.floors import FLOORS


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def _recorded(manifest: dict, bundle: Path) -> dict:
    """The manifest's self-check record; a bundle converted without one gets one line saying to reconvert."""
    rec = manifest.get("selfcheck")
    if rec is None:
        raise SDXSError(
            f"{bundle} records no self-check reference (converted by an earlier sdxs-edge, or without all components): reconvert it to check it without PyTorch, or run parity with a PyTorch reference"
        )
    return rec


def run_selfcheck(
    bundle: str | Path,
    runtime: str,
    runtime_options: dict[str, Any] | None = None,
    rng: str | None = None,
) -> dict:
    """Regenerate the bundle's recorded self-check samples on `runtime` and compare with the recorded images.

    Args:
        bundle: the bundle directory.
        runtime: a `runtimes.RUNTIMES` name.
        runtime_options: keyword options for `runtimes.load`.
        rng: must be the recorded noise generator when given (the recorded images depend on it).

    Returns:
        the report (`format_table`); "failures" names a missed floor.
    """
    bundle = Path(bundle)
    rec = _recorded(load_manifest(bundle, verify=False), bundle)
    if rng is not None and rng != rec["rng"]:
        raise SDXSError(f"the self-check's images were drawn with the {rec['rng']} rng; --rng {rng} cannot match them")
    with runtimes.load(bundle, runtime, **(runtime_options or {})) as rt:
        want = selfcheck.read_images(bundle, rt.manifest)
        got, times = _generate(rt, rec)
        report = _report(rt.manifest, rec, want, got)
        report.update(bundle=str(bundle), runtime=rt.name, cpu_class=rt.runs_as())
        report["cpu_classes_checked_at_conversion"] = cpu.checked_classes(rt.manifest)
    report["timings_ms"] = {"runtime": {c: 1000 * float(np.median(v)) for c, v in times.items()}}
    return report


def _generate(rt, rec: dict) -> tuple[np.ndarray, dict[str, list[float]]]:
    """The runtime's uint8 images of every recorded sample, and its per-component times."""
    images, times = [], {}
    for s in rec["samples"]:
        control = None
        if rt.has_controlnet:
            from sdxs_edge.control import prompt_controls

            control = prompt_controls(s["prompts"], rt.control_shape[-1], s["seed"])
        res = rt.generate_arrays(s["prompts"], noise=rt.noise(s["seed"], rec["rng"]), control_image=control)
        images.append(to_uint8(res.image))
        for c, t in res.timings.items():
            times.setdefault(c, []).append(t)
    return np.concatenate(images), times


def _report(manifest: dict, rec: dict, want: np.ndarray, got: np.ndarray) -> dict:
    floors = FLOORS[manifest["precision"]]
    psnr = metrics.psnr(want, got)
    per_image = [metrics.psnr(a, b) for a, b in zip(want, got)]
    trained = bool(manifest["source"].get("trained", True))
    ok = psnr >= floors.image_psnr_db
    e2e = manifest.get("parity", {}).get("end_to_end", {})
    at_conversion = (e2e["image_psnr_db"] if e2e["image_psnr_db"] is not None else "inf") if "images" in e2e else None
    failures = [f"image PSNR {psnr:.1f} dB < {floors.image_psnr_db:g} dB"] if trained and not ok else []
    return {
        "self_check": True,
        "reference": "recorded PyTorch images (manifest selfcheck)",
        "target": manifest["target"],
        "precision": manifest["precision"],
        "trained": trained,
        "prompts": [p for s in rec["samples"] for p in s["prompts"]],
        "seeds": [s["seed"] for s in rec["samples"]],
        "rng": rec["rng"],
        "samples": len(want),
        "image": {
            "psnr_db": _finite(psnr),
            "psnr_db_min": _finite(min(per_image)),
            "floor_psnr_db": floors.image_psnr_db,
            "enforced": trained,
            "ok": ok,
            "psnr_db_at_conversion": at_conversion,
        },
        "failures": failures,
        "passed": not failures,
    }


def format_table(report: dict, cpu_note: str = "") -> str:
    """A `run_selfcheck` report as lines like `runtimes.parity.format_table`'s.

    Args:
        report: a `run_selfcheck` report.
        cpu_note: the CPU class note (`runtimes.parity.cpu_note`).
    """
    im = report["image"]
    verdict = ("ok" if im["ok"] else "FAIL") if im["enforced"] else "reported only (random weights)"
    conv = im["psnr_db_at_conversion"]
    conv = "not computed" if conv is None else (conv if isinstance(conv, str) else f"{conv:.1f} dB")
    num = lambda x: x if isinstance(x, str) else f"{x:.1f}"
    times = "  ".join(f"{c} {ms:.2f}" for c, ms in report["timings_ms"]["runtime"].items())
    lines = [
        f"self-check  {report['runtime']} vs {report['reference']}  bundle {report['bundle']}  [{report['target']} {report['precision']}]  {report['samples']} image(s), seeds {','.join(map(str, report['seeds']))} ({report['rng']} rng){cpu_note}",
        f"{'image PSNR':<14}{num(im['psnr_db']):>10}{im['floor_psnr_db']:>8g}   min {num(im['psnr_db_min'])} dB  {verdict}  (at conversion: {conv})",
        f"{'runtime ms':<14}{times}",
        "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"]),
    ]
    return "\n".join(lines)
