"""Parity: a bundle on a runtime against its PyTorch source model, with the same inputs and noise.

For every (prompt chunk, seed) the reference runs the whole one-step generation; the runtime then runs
each component on the reference's own inputs (token ids; x_in and the reference context; the
reference x0), so each component's error is measured alone, and the whole generation end to end.
Reported: per component SNR (dB) and max abs error, end-to-end image PSNR (uint8), and on SHAPES-64
prompts, when the evaluator is available, both all-correct rates. Floors depend on the bundle's
precision (`sdxs_edge.floors.FLOORS`, the table the converters check against too); below them `check_floors` raises ParityError.

Noise comes from `Session.noise(seed, rng)`: one latent of the bundle's batch shape per seed, shared by
every prompt chunk (`rng="torch"`, the default, is PyTorch's CPU `torch.randn` stream in numpy, `"numpy"`
the earlier numpy stream; the report records which), fed to both sides, so no result depends on the
reference's own generator.

A bundle with a ControlNet gets the same control images on both sides: canny edges of SHAPES-64 renders
of the prompts' scenes (a random scene for a prompt that is not a SHAPES-64 caption;
`sdxs_edge.control.prompt_controls`, seeded by the noise seed). The ControlNet is compared as a
component (all residuals together), the U-Net on the reference's residuals, and both sides' images get
an edge IoU against the control edges (`sdxs_edge.control.edge_iou` with `canny` of the image): how
closely each follows the control, reported next to the image PSNR.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import runtimes
from runtimes.base import Session, to_uint8
from sdxs_edge import cpu, metrics, sampler, shapes
from sdxs_edge.atomic import write_atomic
from sdxs_edge.errors import ParityError, SDXSError
from sdxs_edge.floors import FLOORS, Floors

COMPONENTS = ("text_encoder", "controlnet", "unet", "decoder")  # those a bundle has, in this order


# The floors (one table, shared with the converters' check): `sdxs_edge.floors`.

# Valid prompts for any model; being SHAPES-64 captions they also feed the evaluator on SHAPES models.
DEFAULT_PROMPTS = (
    "a large cyan triangle at the bottom left on a black background",
    "a small red circle at the top on a white background",
    "a large yellow cross at the center on a black background",
    "a small purple square at the right on a white background",
)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line (blank lines skipped).

    Args:
        path: the file.
    """
    path = Path(path)
    try:
        lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise SDXSError(f"prompt file {path} does not exist") from None
    except UnicodeDecodeError:
        raise SDXSError(f"prompt file {path} is not UTF-8 text") from None
    prompts = [l for l in lines if l]
    if not prompts:
        raise SDXSError(f"prompt file {path} has no prompts")
    return prompts


def _shapes_labels(prompts: Sequence[str]) -> dict[str, np.ndarray] | None:
    """Attribute labels when every prompt is a SHAPES-64 caption, else None."""
    try:
        parsed = [shapes.parse_caption(p) for p in prompts]
    except SDXSError:
        return None
    return {a: np.array([shapes.ATTRIBUTES[a].index(d[a]) for d in parsed], np.int64) for a in shapes.ATTRIBUTES}


def _load_evaluator():
    """(evaluator, None) or (None, why not) - the SHAPES-64 classifier is optional for parity."""
    try:
        from sdxs_edge.evaluate import Evaluator
    except ImportError as e:
        return None, f"sdxs_edge.evaluate cannot be imported: {e}"
    try:
        return Evaluator.load(), None
    except SDXSError as e:
        return None, str(e)


def _finite(x: float) -> float | str:
    """JSON-safe number: an exact match (infinite SNR/PSNR) is written as the string "inf"."""
    return x if math.isfinite(x) else "inf"


def run_parity(
    bundle: str | Path,
    runtime: str,
    reference: Any = None,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    runtime_options: dict[str, Any] | None = None,
    json_out: str | Path | None = None,
    check: bool = True,
    rng: str = "torch",
    width: int | None = None,
    height: int | None = None,
    batch: int | None = None,
) -> dict:
    """Compare a bundle on `runtime` with its PyTorch source model; optionally raise under the floors.

    A bundle of several sizes (`sdxs_edge.sizes`) is compared at each size unless `width` and `height`
    name one: the report's figures are its first size's, and "sizes" holds one row per size, each
    judged against the floors.

    Args:
        bundle: the bundle directory.
        runtime: a `runtimes.RUNTIMES` name.
        reference: model to compare against instead of the manifest's source (preset, folder, hub id or
            loaded `SDXSPipeline`); "none": the PyTorch images the conversion recorded, without PyTorch
            (`runtimes.selfcheck`: the recorded prompts, seeds and rng; image PSNR only).
        prompts: prompts to generate (default `DEFAULT_PROMPTS`).
        seeds: noise seeds (default [0]); every prompt runs with every seed.
        runtime_options: keyword options for `runtimes.load` (e.g. {"providers": ["cpu"]}).
        json_out: write the report here as JSON (before any ParityError, so a failure is inspectable).
        check: raise ParityError when a floor is missed (`check_floors`).
        rng: noise generator for the seeds (`Session.noise`): "torch" (diffusers' noise) or "numpy";
            recorded in the report.
        width: compare at this image width only (with `height`; default: every size of the bundle).
        height: compare at this image height only (with `width`).
        batch: images per run (default: the bundle's declared batch; at most its `max_batch`).

    Returns:
        the report (see `format_table` for the fields shown).
    """
    if isinstance(reference, str) and reference == "none":
        report = _self_check(bundle, runtime, prompts, seeds, runtime_options, rng)
        return _finish(report, runtime_options, json_out, check)
    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    seeds = [int(s) for s in seeds] if seeds is not None else [0]
    if not prompts:
        raise SDXSError("parity needs at least one prompt")
    if not seeds:
        raise SDXSError("parity needs at least one seed")
    with (
        runtimes.load(bundle, runtime, **(runtime_options or {})) as rt,
        runtimes.load(bundle, "torch", reference=reference, verify=False) as ref,
    ):
        report = _compare_sizes(rt, ref, prompts, seeds, reference is not None, rng, width, height, batch)
        report["cpu_class"] = rt.runs_as()
        report["cpu_classes_checked_at_conversion"] = cpu.checked_classes(rt.manifest)
    return _finish(report, runtime_options, json_out, check)


def _self_check(bundle, runtime: str, prompts, seeds, runtime_options, rng: str) -> dict:
    """`reference="none"`: the recorded samples only (`runtimes.selfcheck`)."""
    from runtimes.selfcheck import run_selfcheck

    if prompts is not None or seeds is not None:
        raise SDXSError(
            "--reference none checks the prompts and seeds the bundle recorded at conversion; drop --prompts and --seeds"
        )
    return run_selfcheck(bundle, runtime, runtime_options, rng)


def _finish(report: dict, runtime_options: dict[str, Any] | None, json_out, check: bool) -> dict:
    """Record the runtime options; write the JSON (before any ParityError); check the floors."""
    report["runtime_options"] = {
        k: v if isinstance(v, (str, int, float, bool, type(None))) else list(v)
        for k, v in (runtime_options or {}).items()
    }
    if json_out is not None:
        write_json(report, json_out)
    if check:
        check_floors(report)
    return report


def _compare_sizes(
    rt: Session, ref: Session, prompts, seeds, explicit_reference: bool, rng: str, width, height, batch
) -> dict:
    """`_compare` at each size asked for (every size of the bundle by default); one report, rows per size."""
    if (width is None) != (height is None):
        raise SDXSError("give both --width and --height, or neither (every size of the bundle)")
    b = rt.batch if batch is None else int(batch)
    sizes = [rt.check_size(width, height, b)] if width is not None else [rt.check_size(w, h, b) for w, h in rt.sizes]
    reports = [_compare(rt, ref, prompts, seeds, explicit_reference, rng, size, b) for size in sizes]
    report = reports[0]
    if len(rt.sizes) > 1 or b != rt.batch or width is not None:
        report["batch"] = b
        report["sizes"] = [
            {
                "size": f"{r['width']}x{r['height']}",
                "components": {c: {k: v[k] for k in ("snr_db", "ok")} for c, v in r["components"].items()},
                "image": {k: r["image"][k] for k in ("psnr_db", "enforced", "ok")},
                "all_correct": r["all_correct"],
                "failures": r["failures"],
                "passed": r["passed"],
            }
            for r in reports
        ]
        report["failures"] = [f"{r['width']}x{r['height']}: {f}" for r in reports for f in r["failures"]]
        report["passed"] = not report["failures"]
    return report


def _compare(
    rt: Session,
    ref: Session,
    prompts: list[str],
    seeds: list[int],
    explicit_reference: bool,
    rng: str,
    size: tuple[int, int] | None = None,
    batch: int | None = None,
) -> dict:
    from sdxs_edge.presets import PRESETS

    manifest = rt.manifest
    precision = manifest["precision"]
    floors = FLOORS[precision]
    comps = [c for c in COMPONENTS if c in rt.specs]
    pairs: dict[str, tuple[list, list]] = {c: ([], []) for c in comps}
    ref_images, rt_images, order, controls = [], [], [], []
    rt_times: dict[str, list[float]] = {c: [] for c in comps}
    ref_times: dict[str, list[float]] = {c: [] for c in comps}
    B = rt.batch if batch is None else batch
    W, H = size or rt.sizes[0]
    for seed in seeds:
        for start in range(0, len(prompts), B):
            chunk = prompts[start : start + B]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (B - n)  # fill a static batch; the fill is dropped below
            noise = rt.noise(seed, rng, B, W, H)
            control = None
            if rt.has_controlnet:
                from sdxs_edge.control import prompt_controls

                control = prompt_controls(chunk, rt.control_shape[-1], seed + start)
            want = ref.generate_arrays(chunk, noise=noise, control_image=control, width=W, height=H)
            got = rt.generate_arrays(chunk, noise=noise, control_image=control, width=W, height=H)
            for c in comps:
                rt_times[c].append(got.timings[c])
                ref_times[c].append(want.timings[c])
            # Each component on the reference's own inputs, so its error is its own.
            x_in = sampler.initial_latent(noise, rt.constants)
            residuals = [rt.cast_input("unet", 2 + i, r) for i, r in enumerate(want.residuals)]
            outs = {
                "text_encoder": (want.context, rt.encode_text(want.token_ids)),
                "unet": (
                    want.model_output,
                    rt.denoise(rt.cast_input("unet", 0, x_in), rt.cast_input("unet", 1, want.context), residuals),
                ),
                "decoder": (want.image, rt.decode(rt.cast_input("decoder", 0, want.latent))),
            }
            if control is not None:
                got_res = rt.control_residuals(
                    rt.cast_input("controlnet", 0, x_in),
                    rt.cast_input("controlnet", 1, want.context),
                    rt.prepare_control(control),
                )
                flat = lambda rs, n=n: np.concatenate(
                    [np.asarray(r, np.float32)[:n].reshape(n, -1) for r in rs], axis=1
                )
                outs["controlnet"] = (flat(want.residuals), flat(got_res))
                controls.append(control[:n])
            for c, (a, b) in outs.items():
                pairs[c][0].append(np.asarray(a, np.float32)[:n])
                pairs[c][1].append(np.asarray(b, np.float32)[:n])
            ref_images.append(to_uint8(want.image[:n]))
            rt_images.append(to_uint8(got.image[:n]))
            order.extend(chunk[:n])
    components = {}
    failures = []
    for c in comps:
        a, b = np.concatenate(pairs[c][0]), np.concatenate(pairs[c][1])
        snr = metrics.snr_db(a, b)
        ok = snr >= floors.component_snr_db
        components[c] = {
            "snr_db": _finite(snr),
            "max_abs_error": metrics.max_abs_error(a, b),
            "floor_snr_db": floors.component_snr_db,
            "ok": ok,
        }
        if not ok:
            failures.append(f"{c} SNR {snr:.1f} dB < {floors.component_snr_db:g} dB")
    ri, ti = np.concatenate(ref_images), np.concatenate(rt_images)
    psnr = metrics.psnr(ri, ti)
    per_image = [metrics.psnr(x, y) for x, y in zip(ri, ti)]
    source = ref.pipeline.name
    # The manifest says whether its source is trained (converters record it); a reference given by hand,
    # or a manifest without the flag, counts as trained unless it is a random-weight preset.
    trained = (
        source not in PRESETS if explicit_reference else bool(manifest["source"].get("trained", source not in PRESETS))
    )
    image_ok = psnr >= floors.image_psnr_db
    image = {
        "psnr_db": _finite(psnr),
        "psnr_db_min": _finite(min(per_image)),
        "floor_psnr_db": floors.image_psnr_db,
        "enforced": trained,
        "ok": image_ok,
    }
    if trained and not image_ok:
        failures.append(f"image PSNR {psnr:.1f} dB < {floors.image_psnr_db:g} dB")
    all_correct = _all_correct(order, ri, ti, (W, H), floors)
    control = _control_report(np.concatenate(controls), ri, ti) if controls else None
    if all_correct.get("ok") is False:
        failures.append(
            f"all-correct rate {all_correct['runtime']:.3f} vs reference {all_correct['reference']:.3f} ({all_correct['points']:.1f} points > {floors.all_correct_points:g})"
        )
    return {
        "bundle": str(rt.bundle),
        "runtime": rt.name,
        "reference": source,
        "reference_device": str(getattr(ref, "device", "cpu")),
        "target": manifest["target"],
        "precision": precision,
        "trained": trained,
        "prompts": prompts,
        "seeds": seeds,
        "rng": rng,
        "width": W,
        "height": H,
        "samples": len(order),
        "floors": asdict(floors),
        "components": components,
        "image": image,
        "all_correct": all_correct,
        **({"control": control} if control is not None else {}),
        "timings_ms": {
            "runtime": {c: 1000 * float(np.median(v)) for c, v in rt_times.items()},
            "reference": {c: 1000 * float(np.median(v)) for c, v in ref_times.items()},
        },
        "failures": failures,
        "passed": not failures,
    }


def _all_correct(
    prompts: list[str], ref_images: np.ndarray, rt_images: np.ndarray, size: tuple[int, int], floors: Floors
) -> dict:
    """SHAPES-64 all-correct rates of both sides, or an explicit "n/a" with the reason."""
    labels = _shapes_labels(prompts)
    if labels is None:
        return {"status": "n/a (prompts are not all SHAPES-64 captions)"}
    if tuple(size) != (shapes.SIZE, shapes.SIZE):
        return {
            "status": f"n/a (the images are {size[0]}x{size[1]}; the SHAPES-64 evaluator reads {shapes.SIZE}x{shapes.SIZE})"
        }
    evaluator, why = _load_evaluator()
    if evaluator is None:
        return {"status": f"n/a (no evaluator: {why})"}
    from sdxs_edge.evaluate import accuracy_report

    ref_rate = accuracy_report(evaluator.classify(ref_images), labels)["all_correct"]
    rt_rate = accuracy_report(evaluator.classify(rt_images), labels)["all_correct"]
    points = 100.0 * (ref_rate - rt_rate)
    n = len(prompts)
    enforced = n >= floors.all_correct_min_prompts
    return {
        "status": "measured",
        "reference": ref_rate,
        "runtime": rt_rate,
        "points": points,
        "n": n,
        "enforced": enforced,
        "ok": (points <= floors.all_correct_points) if enforced else None,
    }


def _control_report(controls: np.ndarray, ref_images: np.ndarray, rt_images: np.ndarray) -> dict:
    """Edge IoU of each side's images against the control edges (mean over images), and the runtime's
    change against the reference. Reported, not judged: a random-weight ControlNet follows no edges."""
    from sdxs_edge.control import IOU_TOLERANCE, canny, control_to_edges, edge_iou

    edges = control_to_edges(controls)
    ref_iou = edge_iou(edges, canny(ref_images))
    rt_iou = edge_iou(edges, canny(rt_images))
    return {
        "control_images": "canny edges of SHAPES-64 renders of the prompts' scenes (sdxs_edge.control.prompt_controls; random scenes for other prompts)",
        "edge_iou_reference": float(np.mean(ref_iou)),
        "edge_iou_runtime": float(np.mean(rt_iou)),
        "edge_iou_change": float(np.mean(rt_iou) - np.mean(ref_iou)),
        "tolerance_px": IOU_TOLERANCE,
    }


def check_floors(report: dict) -> None:
    """Raise ParityError naming every missed floor of a `run_parity` report.

    Args:
        report: a `run_parity` report.
    """
    if report["failures"]:
        raise ParityError(
            f"{report['runtime']} on {report['bundle']} ({report['target']} {report['precision']}) is below its parity floors: {'; '.join(report['failures'])}"
        )


def write_json(report: dict, path: str | Path) -> Path:
    """Write a report as JSON, atomically.

    Args:
        report: a `run_parity` report.
        path: destination file.
    """
    return write_atomic(path, json.dumps(report, indent=2) + "\n")


def _num(x, fmt: str) -> str:
    return x if isinstance(x, str) else format(x, fmt)


def cpu_note(report: dict) -> str:
    """ "  CPU class C (checked at conversion | not checked at conversion)", or "" for a non-CPU runtime."""
    cls, checked = report.get("cpu_class"), report.get("cpu_classes_checked_at_conversion", [])
    if not cls:
        return ""
    return f"  CPU class {cls} ({'checked at conversion' if cls in checked else 'not checked at conversion'})"


def format_table(report: dict) -> str:
    """The report as a fixed-width table.

    Args:
        report: a `run_parity` report.
    """
    on = cpu_note(report)
    if report.get("self_check"):
        from runtimes.selfcheck import format_table as self_check_table

        return self_check_table(report, on)
    lines = [
        f"parity  {report['runtime']} vs torch ({report['reference']})  bundle {report['bundle']}  [{report['target']} {report['precision']}]  {report['samples']} sample(s){on}",
        f"{'component':<14}{'SNR dB':>10}{'floor':>8}{'max abs err':>14}{'runtime ms':>12}{'torch ms':>10}  ",
    ]
    for c, r in report["components"].items():
        lines.append(
            f"{c:<14}{_num(r['snr_db'], '.1f'):>10}{r['floor_snr_db']:>8g}{r['max_abs_error']:>14.3e}"
            f"{report['timings_ms']['runtime'][c]:>12.2f}{report['timings_ms']['reference'][c]:>10.2f}  {'ok' if r['ok'] else 'FAIL'}"
        )
    im = report["image"]
    verdict = ("ok" if im["ok"] else "FAIL") if im["enforced"] else "reported only (random weights)"
    lines.append(
        f"{'image PSNR':<14}{_num(im['psnr_db'], '.1f'):>10}{im['floor_psnr_db']:>8g}   min {_num(im['psnr_db_min'], '.1f')} dB  {verdict}"
    )
    ac = report["all_correct"]
    if ac["status"] == "measured":
        lines.append(
            f"{'all-correct':<14}runtime {ac['runtime']:.3f}  reference {ac['reference']:.3f}  ({-ac['points']:+.1f} points, n={ac['n']})  {'not judged (n < ' + str(FLOORS[report['precision']].all_correct_min_prompts) + ')' if ac['ok'] is None else ('ok' if ac['ok'] else 'FAIL')}"
        )
    else:
        lines.append(f"{'all-correct':<14}{ac['status']}")
    ctl = report.get("control")
    if ctl:
        lines.append(
            f"{'edge IoU':<14}runtime {ctl['edge_iou_runtime']:.3f}  reference {ctl['edge_iou_reference']:.3f}  ({ctl['edge_iou_change']:+.3f}; canny of the image vs the control edges, reported only)"
        )
    for row in report.get("sizes", []):
        snrs = "  ".join(f"{c} {_num(v['snr_db'], '.1f')}" for c, v in row["components"].items())
        ac = row["all_correct"]
        acs = f"all-correct {ac['runtime']:.3f}" if ac["status"] == "measured" else "all-correct n/a"
        lines.append(
            f"{'size ' + row['size']:<14}SNR dB {snrs}  image PSNR {_num(row['image']['psnr_db'], '.1f')}  {acs}  {'ok' if row['passed'] else 'FAIL'}"
        )
    lines.append("PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"]))
    return "\n".join(lines)
