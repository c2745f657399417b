"""The figures README.md and docs/ share, generated from the committed result files.

    python -m benchmarks.doc_tables           # rewrite every generated block in README.md and docs/*.md
    python -m benchmarks.doc_tables --check   # exit 1 when a block differs from its result file (a test runs this)

A generated block sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; NAME is a key of
`TABLES`. Each block names the result file its figures come from and the machine (CPU model, SIMD flags)
they were measured on.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from sdxs_edge import cpu

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
COMPONENTS = ("text_encoder", "unet", "decoder")


def _load(name: str) -> dict:
    return json.loads((RESULTS / name / "results.json").read_text())


def _machine(rep: dict, name: str) -> str:
    m, cfg = rep["machine"], rep["config"]
    flags = ", ".join(f for f, on in m["flags"].items() if on) or "none"
    cls = cpu.classify(m.get("machine", "x86_64"), {f for f, on in m["flags"].items() if on})
    rounds = f", {cfg['rounds']} rounds" if cfg.get("rounds", 1) > 1 else ""
    return (
        f"Source: `benchmarks/results/{name}/results.json` (CPU class {cls}: {m['cpu_model']}, {m['usable_cores']} usable cores, "
        f"SIMD: {flags}; every backend on {cfg['threads']} threads, {cfg['runs']} runs{rounds}, median)."
    )


def _ms(path: dict, comp: str) -> str:
    c = path["components"].get(comp)
    if c is None:
        return "-"
    ms = c["median_ms"]
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _psnr(path: dict) -> str:
    par = path.get("parity")
    if not par:
        return "reference"
    return "exact" if par.get("image_psnr_db") is None else f"{par['image_psnr_db']:.1f} dB"


def cpu_table(name: str) -> str:
    """Every measured path of one CPU run, and the teacher's guided total."""
    rep = _load(name)
    lines = [
        "| path | text encoder ms | U-Net ms | decoder ms | s / image | peak RSS MB | bundle MB | image PSNR vs PyTorch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in rep["paths"]:
        if p["status"] != "ok":
            continue
        bundle = "-" if p.get("bundle_mb") is None else f"{p['bundle_mb']:.0f}"
        cells = [p["name"], *(_ms(p, c) for c in COMPONENTS), f"{p['end_to_end']['median_s']:.4g}"]
        cells += [f"{p['peak_rss_mb']:.0f}", bundle, _psnr(p)]
        lines.append("| " + " | ".join(cells) + " |")
    t = rep["baselines"].get("teacher")
    if t and t.get("status") == "ok":
        cfg = t["projection"]["cfg"]
        row = [f"{t['model']}, {cfg['steps']} steps + guidance (torch eager)", f"{cfg['text_encoder_ms']:.0f}"]
        row += [
            f"{cfg['steps']} x {cfg['unet_ms_per_eval']:.0f}",
            f"{cfg['decoder_ms']:.0f}",
            f"{cfg['total_s']:.4g}",
            "",
            "",
            "",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join([*lines, "", _machine(rep, name)])


def headline() -> str:
    """The ratios the README leads with, from the sdxs-512 CPU run."""
    name = "sdxs-512-512-x86-64-avx512-vnni"
    rep = _load(name)
    r = rep["ratios"]
    fast = r["fastest_int8_vs_torch_eager_fp32"]["denominator"]
    ov = r["fastest_int8_vs_openvino_best"]
    mem = r["fastest_int8_peak_rss_over_bundle"]
    lines = [
        f"- sdxs-512 at 512x512 on CPU: **{fast['value']:.3f} s per image** with `{fast['path']}` "
        f"({r['fastest_int8_vs_torch_eager_fp32']['value']:.1f}x torch eager fp32, "
        f"{ov['value']:.2f}x {ov['numerator']['path']} at {ov['numerator']['value']:.3f} s).",
        f"- Peak memory of that path {mem['numerator']['value']:.0f} MB, {mem['value']:.2f}x its {mem['denominator']['value']:.0f} MB bundle.",
        *_native_line(rep, fast["path"], ov["numerator"]),
        f"- One step against SD-2.1-base's architecture at 25 guided steps: {r['one_step_vs_teacher_cfg']['value']:.0f}x faster "
        f"(torch eager fp32 on both sides).",
        "",
        _machine(rep, name),
    ]
    return "\n".join(lines)


def _native_line(rep: dict, fastest: str, openvino: dict) -> list[str]:
    """When the fastest int8 path is not the C++ runner, a line for the runner (the same programs, no
    PyTorch in the process: what an app embeds)."""
    if fastest == "executorch-native int8":
        return []
    p = next(
        (p for p in rep["paths"] if (p["runtime"], p["precision"], p["status"]) == ("executorch-native", "int8", "ok")),
        None,
    )
    if p is None:
        return []
    s, mem = p["end_to_end"]["median_s"], p["peak_rss_mb"]
    return [
        f"- The same int8 programs in the C++ runner, no PyTorch in the process (`executorch-native int8`): "
        f"{s:.3f} s per image ({openvino['value'] / s:.2f}x {openvino['path']}), peak memory {mem:.0f} MB, "
        f"{mem / p['bundle_mb']:.2f}x its bundle."
    ]


def gpu_table() -> str:
    """torch on CUDA (fp16 eager and compiled) for both models."""
    lines = [
        "| model | mode | text encoder / U-Net / decoder ms | batch 1 img/s | best batch | best img/s |",
        "|---|---|---|---:|---:|---:|",
    ]
    sources = []
    for name, label in (
        ("sdxs-512-512-h200", "sdxs-512 at 512x512"),
        ("default_model-64-h200", "shapes model at 64x64"),
    ):
        rep = _load(name)
        g = rep["gpu"]
        for mode, mlabel in (("eager", "fp16 eager"), ("compiled_reduce_overhead", "fp16 compiled")):
            m = g[mode]
            comp = " / ".join(f"{m['batch1']['components'][c]['median_ms']:.2f}" for c in COMPONENTS)
            last = m["searched"][-1]
            cap = " (cap)" if last["batch"] == m["best_batch"]["batch"] and not last.get("out_of_memory") else ""
            cells = [label, mlabel, comp, f"{m['batch1']['end_to_end']['images_per_s']:.1f}"]
            cells += [f"{m['best_batch']['batch']}{cap}", f"{m['best_batch']['images_per_s']:,.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        sources.append(f"`benchmarks/results/{name}/results.json` ({g['device']}, {g['dtype']})")
    return "\n".join([*lines, "", "Source: " + " and ".join(sources) + "."])


TABLES = {
    "headline": headline,
    "cpu-sdxs512": lambda: cpu_table("sdxs-512-512-x86-64-avx512-vnni"),
    "cpu-shapes": lambda: cpu_table("default_model-64-x86-64-avx512-vnni"),
    "gpu": gpu_table,
}
BLOCK = re.compile(r"(<!-- generated:([\w-]+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.S)


def render(text: str) -> str:
    """`text` with every generated block filled from its result file."""

    def fill(m: re.Match) -> str:
        if m.group(2) not in TABLES:
            raise KeyError(f"unknown generated block {m.group(2)!r}; blocks: {', '.join(TABLES)}")
        return f"{m.group(1)}{TABLES[m.group(2)]()}\n{m.group(4)}"

    return BLOCK.sub(fill, text)


def stale(files=DOCS) -> list[str]:
    """The files whose generated blocks differ from their result files."""
    return [str(f.relative_to(ROOT)) for f in files if f.read_text() != render(f.read_text())]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--check"]:
        bad = stale()
        for f in bad:
            print(f"{f}: generated figures are out of date; run python -m benchmarks.doc_tables")
        return 1 if bad else 0
    for f in DOCS:
        f.write_text(render(f.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
