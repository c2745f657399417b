"""The ONNX int8 form, chosen by measurement: convert the shipped model to ONNX int8 once per form of
onnxruntime's QDQ quantizer and record the conversion check's figures on this machine's CPU class.

    python -m benchmarks.int8_forms [--model sdxs_edge/default_model] [--out benchmarks/results]

Forms: u8s8 (uint8 activations, int8 weights: onnxruntime's default), u8s8-reduce-range (7-bit weights),
u8u8 (uint8 weights; `converters.to_onnx.INT8_FORM`), s8s8. Each conversion runs the project's converter
with the quantizer's arguments swapped; a form whose check fails a floor is recorded with the failure.
Writes int8-forms-<cpu class>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sdxs_edge import cpu
from sdxs_edge.errors import SDXSError

FORMS = {  # every argument that makes the form, so the converter's own choice never leaks through
    "u8s8": {"activation_type": "QUInt8", "weight_type": "QInt8", "reduce_range": False},
    "u8s8-reduce-range": {"activation_type": "QUInt8", "weight_type": "QInt8", "reduce_range": True},
    "u8u8": {"activation_type": "QUInt8", "weight_type": "QUInt8", "reduce_range": False},
    "s8s8": {"activation_type": "QInt8", "weight_type": "QInt8", "reduce_range": False},
}


def _with_form(form: str):
    """Patch onnxruntime's quantize_static / quantize_dynamic to take `form`'s arguments; returns undo."""
    import onnxruntime.quantization as oq

    orig = oq.quantize_static, oq.quantize_dynamic
    swap = {k: getattr(oq.QuantType, v) if isinstance(v, str) else v for k, v in FORMS[form].items()}

    def static(*a, **kw):
        return orig[0](*a, **{**kw, **swap})

    def dynamic(*a, **kw):
        return orig[1](*a, **{**kw, **{k: v for k, v in swap.items() if k != "activation_type"}})

    oq.quantize_static, oq.quantize_dynamic = static, dynamic
    return lambda: (setattr(oq, "quantize_static", orig[0]), setattr(oq, "quantize_dynamic", orig[1]))


def measure(model: str, form: str) -> dict:
    import os

    from converters import convert
    from converters.sensitivity_cache import SWITCH_ENV

    os.environ[SWITCH_ENV] = "off"  # the cache's key cannot see the form swapped in behind the converter

    undo = _with_form(form)
    t = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = convert(model, "onnx", "int8", Path(tmp) / "b", progress=False)
            m = json.loads((out / "manifest.json").read_text())
    except SDXSError as e:
        return {
            "form": form,
            "status": "failed",
            "error": str(e).splitlines()[0],
            "seconds": round(time.perf_counter() - t, 1),
        }
    finally:
        undo()
    par = m["parity"]
    return {
        "form": form,
        "status": "ok",
        "snr_db": {c: p["snr_db"] for c, p in par["components"].items()},
        "image_psnr_db": par["end_to_end"]["image_psnr_db"],
        "kept_in_float": {
            c: len(r["int8"].get("sensitivity", {}).get("excluded_nodes", []))
            for c, r in m["conversion"]["components"].items()
            if "int8" in r
        },
        "seconds": round(time.perf_counter() - t, 1),
    }


def markdown(report: dict) -> str:
    lines = [
        f"# ONNX int8 forms on {report['cpu_class']} ({report['cpu_model']})",
        "",
        f"`python -m benchmarks.int8_forms --model {report['model']}`; the converter's own check (2 parity prompts).",
        "",
        "| form | text encoder SNR | U-Net SNR | decoder SNR | image PSNR | result |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in report["forms"]:
        if r["status"] == "ok":
            s = r["snr_db"]
            lines.append(
                f"| {r['form']} | {s['text_encoder']:.1f} dB | {s['unet']:.1f} dB | {s['decoder']:.1f} dB | {r['image_psnr_db']:.1f} dB | ok |"
            )
        else:
            lines.append(f"| {r['form']} | | | | | failed: {r['error']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import machine_info
    from sdxs_edge.atomic import write_atomic

    ap = argparse.ArgumentParser(prog="python -m benchmarks.int8_forms", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sdxs_edge/default_model")
    ap.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)}")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    forms = [f for f in args.forms.split(",") if f]
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        ap.error(f"unknown form(s) {unknown}; known: {', '.join(FORMS)}")
    info = machine_info()
    report = {
        "model": args.model,
        "cpu_class": cpu.host_class(),
        "cpu_model": info["cpu_model"],
        "machine": info,
        "forms": [],
    }
    for form in forms:
        report["forms"].append(measure(args.model, form))
        print(json.dumps(report["forms"][-1]))
    stem = args.out / f"int8-forms-{report['cpu_class']}"
    write_atomic(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(stem.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
