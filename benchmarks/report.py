"""Turn measured rows into the report: machine facts, baseline projections, ratios, a "where the time
goes" summary, the markdown table and the stacked-bar chart. Every figure here is computed from the
measured numbers handed in; nothing is quoted.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sdxs_edge import cpu

COMPONENTS = ("text_encoder", "unet", "decoder")
LABELS = {
    "text_encoder": "text encoder",
    "unet": "U-Net",
    "decoder": "decoder",
    "other": "other (tokenizer, sampler, copies)",
}
LIBRARIES = (
    "torch",
    "onnxruntime",
    "onnx",
    "executorch",
    "openvino",
    "nncf",
    "diffusers",
    "transformers",
    "numpy",
    "matplotlib",
)
FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "neon",
    "asimddp",
)


# ---- machine -------------------------------------------------------------------------------------------
def _lib_versions() -> dict[str, str | None]:
    out = {}
    for n in LIBRARIES:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def machine_info() -> dict[str, Any]:
    """CPU model, cores, SIMD flags (from /proc/cpuinfo), memory, OS and library versions of this host."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model, flags, cores = None, set(), set()
        phys = core = None
        for line in cpuinfo.read_text().splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key in ("model name", "Model", "cpu model") and model is None:
                model = val
            elif key in ("flags", "Features") and not flags:
                flags = set(val.split())
            elif key == "physical id":
                phys = val
            elif key == "core id":
                core = val
                cores.add((phys, core))
        info["cpu_model"] = model or platform.processor() or platform.machine()
        info["physical_cores"] = len(cores) or None
        info["flags"] = {f: f in flags for f in FLAGS}
        info["flags_source"] = "/proc/cpuinfo"
    else:
        info["cpu_model"] = platform.processor() or platform.machine()
        info["physical_cores"] = None
        info["flags"] = {}
        info["flags_source"] = "not available (no /proc/cpuinfo on this OS)"
    info["cpu_class"] = cpu.host_class()
    info["logical_cores"] = os.cpu_count()
    info["usable_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kb = next((int(ln.split()[1]) for ln in meminfo.read_text().splitlines() if ln.startswith("MemTotal:")), None)
        info["memory_gb"] = round(kb / (1 << 20), 1) if kb else None
    info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    info["libraries"] = _lib_versions()
    return info


# ---- baselines -----------------------------------------------------------------------------------------
def med(row: dict | None, comp: str) -> float | None:
    """Median milliseconds of one component of a measured row (None when not measured)."""
    if not row or row.get("status") != "ok":
        return None
    c = row.get("components", {}).get(comp)
    return c["median_ms"] if c else None


TEACHER_METHOD = (
    "one step: text encoder + one U-Net evaluation at batch 1 + decoder; N steps with classifier-free "
    "guidance (as diffusers runs SD-2.1): text encoder twice (prompt and empty prompt), N U-Net evaluations "
    "at batch 2 (conditional and unconditional halves together), decoder once; each term is the measured "
    "median of that call; scheduler arithmetic (microseconds) is left out"
)


def teacher_projection(teacher: dict, steps: int) -> dict:
    """Totals of the baseline architecture from its per-component medians (see TEACHER_METHOD).

    Args:
        teacher: the teacher worker's result (components text_encoder, unet_batch1, unet_batch2_cfg, decoder).
        steps: the guided step count N.
    """
    c = teacher["components"]
    te, u1, u2, dec = (c[k]["median_ms"] for k in ("text_encoder", "unet_batch1", "unet_batch2_cfg", "decoder"))
    one = {
        "text_encoder_ms": te,
        "unet_ms_per_eval": u1,
        "unet_evals": 1,
        "unet_batch": 1,
        "unet_ms": u1,
        "decoder_ms": dec,
    }
    one["total_s"] = round((te + u1 + dec) / 1000, 6)
    cfg = {
        "steps": steps,
        "text_encoder_calls": 2,
        "text_encoder_ms": 2 * te,
        "unet_ms_per_eval": u2,
        "unet_evals": steps,
        "unet_batch": 2,
        "unet_ms": steps * u2,
        "decoder_ms": dec,
    }
    cfg["total_s"] = round((2 * te + steps * u2 + dec) / 1000, 6)
    return {"one_step": one, "cfg": cfg}


def same_method(row: dict) -> dict | None:
    """The one-step model's total computed like the teacher's (sum of component medians)."""
    parts = {c: med(row, c) for c in COMPONENTS}
    if any(v is None for v in parts.values()):
        return None
    return {
        "text_encoder_ms": parts["text_encoder"],
        "unet_ms": parts["unet"],
        "unet_evals": 1,
        "decoder_ms": parts["decoder"],
        "total_s": round(sum(parts.values()) / 1000, 6),
    }


# ---- ratios --------------------------------------------------------------------------------------------
def _e2e(row: dict) -> float:
    return row["end_to_end"]["median_s"]


def _ratio(meaning: str, num: tuple[str, str, float], den: tuple[str, str, float]) -> dict:
    return {
        "value": round(num[2] / den[2], 4) if den[2] else None,
        "meaning": meaning,
        "numerator": {"path": num[0], "field": num[1], "value": num[2]},
        "denominator": {"path": den[0], "field": den[1], "value": den[2]},
    }


def _missing(meaning: str, why: str) -> dict:
    return {"value": None, "meaning": meaning, "why": why}


def fastest(rows: list[dict], **match) -> dict | None:
    """The measured row with the smallest end-to-end median among those matching every key=value
    (a value may be a tuple of allowed values; a key prefixed `not_` excludes)."""

    def ok(r):
        if r.get("status") != "ok":
            return False
        for k, v in match.items():
            if k.startswith("not_"):
                if r.get(k[4:]) == v:
                    return False
            elif r.get(k) not in (v if isinstance(v, tuple) else (v,)):
                return False
        return True

    cands = [r for r in rows if ok(r)]
    return min(cands, key=_e2e) if cands else None


def compute_ratios(paths: list[dict], teacher: dict | None, torch_name: str) -> dict:
    """The headline ratios, each with its numerator and denominator as measured (so it can be checked)."""
    out = {}
    torch_row = next((r for r in paths if r["name"] == torch_name and r.get("status") == "ok"), None)
    i8 = fastest(paths, precision="int8", not_runtime="openvino")
    ov = fastest(paths, runtime="openvino")
    E2E = "end_to_end.median_s"

    m = "end-to-end speed-up of the fastest int8 path over torch eager fp32 (x, higher is faster)"
    if i8 and torch_row:
        out["fastest_int8_vs_torch_eager_fp32"] = _ratio(
            m, (torch_row["name"], E2E, _e2e(torch_row)), (i8["name"], E2E, _e2e(i8))
        )
    else:
        out["fastest_int8_vs_torch_eager_fp32"] = _missing(
            m, "no int8 path measured" if not i8 else "torch eager fp32 not measured"
        )

    m = "end-to-end speed of the fastest int8 path relative to the best OpenVINO path (x, above 1: ours is faster)"
    if i8 and ov:
        out["fastest_int8_vs_openvino_best"] = _ratio(m, (ov["name"], E2E, _e2e(ov)), (i8["name"], E2E, _e2e(i8)))
    else:
        out["fastest_int8_vs_openvino_best"] = _missing(
            m, "no int8 path measured" if not i8 else "no OpenVINO path measured"
        )

    m = "peak resident memory of the fastest int8 path over its bundle size on disk"
    if i8 and i8.get("bundle_mb"):
        out["fastest_int8_peak_rss_over_bundle"] = _ratio(
            m, (i8["name"], "peak_rss_mb", i8["peak_rss_mb"]), (i8["name"], "bundle_mb", i8["bundle_mb"])
        )
    else:
        out["fastest_int8_peak_rss_over_bundle"] = _missing(m, "no int8 path measured")

    sdxs = same_method(torch_row) if torch_row else None
    for key, which, m in (
        (
            "one_step_vs_teacher_cfg",
            "cfg",
            "teacher at its multi-step count with classifier-free guidance over the one-step model, both torch eager fp32, same threads (x)",
        ),
        (
            "one_step_vs_teacher_one_step",
            "one_step",
            "teacher at one step over the one-step model, both torch eager fp32 (x): the architecture alone",
        ),
    ):
        if teacher and teacher.get("status") == "ok" and sdxs:
            t = teacher["projection"][which]
            out[key] = _ratio(
                m,
                (f"{teacher['model']} {which}", f"baselines.teacher.projection.{which}.total_s", t["total_s"]),
                (torch_row["name"], "same_method.total_s", sdxs["total_s"]),
            )
        else:
            out[key] = _missing(
                m,
                "teacher baseline not measured"
                if not (teacher and teacher.get("status") == "ok")
                else "torch eager fp32 not measured",
            )
    return out


# ---- where the time goes -------------------------------------------------------------------------------
def other_ms(row: dict) -> float:
    """Median per-run time outside the three components (tokenizer, noise, sampler rule, copies, checks)."""
    o = row.get("other")
    return o["median_ms"] if o else max(_e2e(row) * 1000 - sum(med(row, c) or 0.0 for c in COMPONENTS), 0.0)


def _share(row: dict) -> list[tuple[str, float]]:
    """Each part's median as a share of the sum of the part medians (which is close to the end-to-end median)."""
    parts = [(c, med(row, c) or 0.0) for c in COMPONENTS] + [("other", other_ms(row))]
    total = sum(v for _, v in parts) or 1.0
    return [(c, 100 * v / total) for c, v in parts]


def where_the_time_goes(paths: list[dict], teacher: dict | None, torch_name: str) -> list[str]:
    """Short sentences generated from the per-component numbers."""
    lines = []
    ok = [r for r in paths if r.get("status") == "ok"]
    if not ok:
        return ["No path was measured."]
    best = min(ok, key=_e2e)
    shares = ", ".join(f"{LABELS[c]} {p:.0f}%" for c, p in sorted(_share(best), key=lambda x: -x[1]))
    lines.append(f"Fastest path: {best['name']} at {_e2e(best) * 1000:.1f} ms per image ({shares}).")
    torch_row = next((r for r in ok if r["name"] == torch_name), None)
    if torch_row and torch_row is not best:
        shares = ", ".join(f"{LABELS[c]} {p:.0f}%" for c, p in sorted(_share(torch_row), key=lambda x: -x[1]))
        lines.append(f"{torch_row['name']}: {_e2e(torch_row) * 1000:.1f} ms ({shares}).")
    for c in COMPONENTS:
        have = [(med(r, c), r["name"]) for r in ok if med(r, c) is not None]
        if len(have) > 1:
            lo, hi = min(have), max(have)
            lines.append(
                f"{LABELS[c]}: fastest on {lo[1]} ({lo[0]:.1f} ms), slowest on {hi[1]} ({hi[0]:.1f} ms), x{hi[0] / lo[0]:.2f} apart."
            )
    for rt in sorted({r["runtime"] for r in ok}):
        f32 = next((r for r in ok if r["runtime"] == rt and r["precision"] == "fp32"), None)
        for p in ("fp16", "int8"):
            q = next((r for r in ok if r["runtime"] == rt and r["precision"] == p), None)
            if f32 and q:
                parts = ", ".join(
                    f"{LABELS[c]} x{med(f32, c) / med(q, c):.2f}" for c in COMPONENTS if med(f32, c) and med(q, c)
                )
                lines.append(
                    f"{p} vs fp32 on {rt} (speed-up, above 1 is faster): {parts}; end to end x{_e2e(f32) / _e2e(q):.2f}."
                )
    mem = [r for r in ok if r.get("peak_rss_mb")]
    if len(mem) > 1:
        lo, hi = min(mem, key=lambda r: r["peak_rss_mb"]), max(mem, key=lambda r: r["peak_rss_mb"])
        lines.append(
            f"Peak memory: {lo['peak_rss_mb']:.0f} MB on {lo['name']} to {hi['peak_rss_mb']:.0f} MB on {hi['name']}."
        )
    loads = [r for r in ok if r.get("load_s") is not None]
    if loads:
        lo, hi = min(loads, key=lambda r: r["load_s"]), max(loads, key=lambda r: r["load_s"])
        lines.append(f"Load: {lo['load_s']:.2f} s on {lo['name']} to {hi['load_s']:.2f} s on {hi['name']}.")
    if teacher and teacher.get("status") == "ok":
        cfg = teacher["projection"]["cfg"]
        u = cfg["unet_ms"] / (cfg["total_s"] * 1000) * 100
        lines.append(
            f"{teacher['model']} with {cfg['steps']} steps and guidance: {cfg['total_s']:.2f} s, of which the U-Net is {u:.0f}% "
            f"({cfg['steps']} evaluations x {cfg['unet_ms_per_eval']:.1f} ms at batch 2) and its decoder {cfg['decoder_ms']:.1f} ms."
        )
    return lines


# ---- markdown --------------------------------------------------------------------------------------------
def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def _parity_cell(p: dict | None) -> str:
    if not p:
        return "-"
    comps = p.get("components", {})
    snrs = [v for v in comps.values() if isinstance(v, (int, float))]
    exact = [k for k, v in comps.items() if v is None]
    parts = []
    if snrs:
        parts.append(f"min SNR {min(snrs):.1f} dB")
    elif exact and len(exact) == len(comps):
        parts.append("exact")
    elif comps:
        parts.append(", ".join(f"{k}: {v}" for k, v in comps.items() if isinstance(v, str)))
    if p.get("image_psnr_db") is not None:
        parts.append(f"image {p['image_psnr_db']:.1f} dB")
    return "; ".join(parts) or "-"


def _threads_cell(t: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (t or {}).items()) or "-"


def markdown(report: dict) -> str:
    """results.md: the machine, every path, the baselines, ratios, conversions and GPU figures."""
    sections = (_md_machine, _md_paths, _md_baselines, _md_ratios, _md_conversions, _md_gpu)
    return "\n".join(line for section in sections for line in section(report)) + "\n"


def _md_machine(report: dict) -> list[str]:
    """Title, machine, libraries and method."""
    mach, cfg = report["machine"], report["config"]
    on = [f for f, v in mach["flags"].items() if v]
    flags = (", ".join(on) or "none of " + ", ".join(mach["flags"])) if mach["flags"] else mach["flags_source"]
    libs = ", ".join(f"{k} {v}" for k, v in mach["libraries"].items() if v)
    L = [
        f"# Benchmark: {report['model']['name']} at {cfg['resolution']}x{cfg['resolution']}, batch 1",
        "",
        f"Machine: {mach['cpu_model']}, {mach['physical_cores'] or '?'} physical / {mach['logical_cores']} logical cores "
        f"({mach['usable_cores']} usable), {mach.get('memory_gb', '?')} GB; SIMD: {flags}. Load average at start "
        f"{mach['load_average_at_start']}, at end {mach.get('load_average_at_end')}.",
        "",
        f"Libraries: {libs}. Python {mach['python']}, {mach['platform']}.",
        "",
        f"Every backend pinned to {cfg['threads']} threads. {cfg['runs']} measured runs after {cfg['warmup']} warm-up; median / p90. "
        + (
            f"Every path (not the teacher) was measured in {cfg['rounds']} rounds, round-robin, each round in a fresh process; its {cfg['rounds'] * cfg['runs']} runs are pooled. "
            if cfg.get("rounds", 1) > 1
            else ""
        )
        + "Each path ran in its own process: peak RSS is that process's own high-water mark (VmHWM), including its imports and load. "
        f"Attention layout of the converted bundles (OpenVINO's included): {cfg.get('attention', 'standard')}.",
        "",
    ]
    return L


def _md_paths(report: dict) -> list[str]:
    """Warnings and the table of measured paths."""
    L: list[str] = []
    L += [f"**Warning:** {w}." for w in report.get("warnings", [])]
    L += [
        "",
        "| path | status | threads | load s | first run s | text encoder ms | U-Net ms | decoder ms | end to end s (median / p90) | img/s | peak RSS MB | bundle MB | convert s | parity vs PyTorch |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["paths"]:
        if r["status"] != "ok":
            L.append(f"| {r['name']} | {r['status']}: {r.get('reason', '')} |  |  |  |  |  |  |  |  |  |  |  |  |")
            continue
        comp = [
            f"{med(r, c):.1f} / {r['components'][c]['p90_ms']:.1f}" if med(r, c) is not None else "-"
            for c in COMPONENTS
        ]
        e = r["end_to_end"]
        L.append(
            f"| {r['name']} | ok | {_threads_cell(r.get('threads'))} | {_f(r.get('load_s'), '{:.2f}')} | {_f(r.get('first_run_s'), '{:.3f}')} | "
            f"{comp[0]} | {comp[1]} | {comp[2]} | {e['median_s']:.4f} / {e['p90_s']:.4f} | {_f(e['images_per_s'], '{:.2f}')} | "
            f"{_f(r.get('peak_rss_mb'), '{:.0f}')} | {_f(r.get('bundle_mb'), '{:.2f}') if r.get('bundle_mb') is not None else _f(r.get('weights_mb'), '{:.2f} (weights)')} | {_f(r.get('conversion_s'), '{:.1f}')} | {_parity_cell(r.get('parity'))} |"
        )
    L += [
        "",
        "Component cells are median / p90 ms. Bundle MB is everything in the bundle folder (programs, tokenizer, manifest); for torch eager it is the fp32 weights in memory.",
    ]
    for r in report["paths"]:
        run = r.get("runner") if r["status"] == "ok" else None
        if run:  # executorch-native: the programs run in the host runner, a second process
            ex = ", ".join(f"{c.replace('_', ' ')} {v['median_ms']:.1f}" for c, v in run["execute_ms"].items())
            L.append(
                f"{r['name']}: the programs run in one `sdxs_runner --serve` process (runtimes/native/runner.cpp, no PyTorch; XNNPACK workspace sharing "
                f"{run['workspace_sharing']}) driven by a numpy-only Python process over /dev/shm files. Peak RSS is both together: runner {run['peak_rss_mb']:.0f} MB "
                f"+ driver {r['driver_peak_rss_mb']:.0f} MB. The runner's own Method::execute medians (ms): {ex}; the component cells add the file round trip."
            )
    return L


def _md_baselines(report: dict) -> list[str]:
    """The multi-step teacher against the one-step model."""
    cfg, L = report["config"], []
    t = report["baselines"].get("teacher")
    L += ["", "## Baselines: one step against the multi-step teacher architecture", ""]
    if t and t.get("status") == "ok":
        one, cfgp = t["projection"]["one_step"], t["projection"]["cfg"]
        sd = report["baselines"].get("one_step_same_method")
        L += [
            f"{t['model']} (random weights, {t['unet_class']} + {t['vae_class']}) at {cfg['resolution']}x{cfg['resolution']}, torch eager fp32, "
            f"per component, {cfg['runs']} runs; totals = component medians x calls. Load {t['load_s']:.1f} s, peak RSS {t['peak_rss_mb']:.0f} MB.",
            "",
            "| model and schedule | text encoder ms | U-Net ms per evaluation | U-Net evaluations | decoder ms | total s |",
            "|---|---:|---:|---:|---:|---:|",
            f"| {t['model']}, 1 step | {one['text_encoder_ms']:.1f} | {one['unet_ms_per_eval']:.1f} (batch 1) | 1 | {one['decoder_ms']:.1f} | {one['total_s']:.3f} |",
            f"| {t['model']}, {cfgp['steps']} steps, guidance {t['guidance']} | {cfgp['text_encoder_ms']:.1f} (2 calls) | {cfgp['unet_ms_per_eval']:.1f} (batch 2) | {cfgp['steps']} | {cfgp['decoder_ms']:.1f} | {cfgp['total_s']:.3f} |",
        ]
        if sd:
            L.append(
                f"| {report['model']['name']}, 1 step (torch eager fp32) | {sd['text_encoder_ms']:.1f} | {sd['unet_ms']:.1f} (batch 1) | 1 | {sd['decoder_ms']:.1f} | {sd['total_s']:.3f} |"
            )
    elif t:
        L.append(f"{t['model']}: {t['status']}: {t.get('reason', '')}")
    else:
        L.append("Not run (--no-baselines).")
    return L


def _md_ratios(report: dict) -> list[str]:
    """Every ratio with the figures it divides."""
    L = ["", "## Ratios", "", "| ratio | value | numerator | denominator |", "|---|---:|---|---|"]
    for k, r in report["ratios"].items():
        if r["value"] is None:
            L.append(f"| {k}: {r['meaning']} | - | {r.get('why', '')} |  |")
        else:
            n, d = r["numerator"], r["denominator"]
            L.append(
                f"| {k}: {r['meaning']} | {r['value']:.3f} | {n['path']} {n['field']} = {n['value']:.4g} | {d['path']} {d['field']} = {d['value']:.4g} |"
            )

    L += ["", "## Where the time goes", ""] + [f"- {s}" for s in report["where_the_time_goes"]]
    return L


def _md_conversions(report: dict) -> list[str]:
    """One row per bundle converted or reused."""
    L: list[str] = []
    conv = report.get("conversions", [])
    if conv:
        L += [
            "",
            "## Conversions",
            "",
            "| bundle | status | convert s (in process) | wall s | bundle MB | parity vs PyTorch |",
            "|---|---|---:|---:|---:|---|",
        ]
        for c in conv:
            status = "reused" if c.get("reused") else c["status"]
            if c["status"] != "ok":
                status = f"{c['status']}: {c.get('error', '')}"
            L.append(
                f"| {c['target']}/{c['precision']} | {status} | {_f(c.get('seconds'))} | {_f(c.get('wall_s'))} | {_f(c.get('bundle_mb'), '{:.2f}')} | {_parity_cell(c.get('parity'))} |"
            )
    return L


def _md_gpu(report: dict) -> list[str]:
    """Torch on CUDA, when measured."""
    L: list[str] = []
    gpu = report.get("gpu")
    L += ["", "## GPU", ""]
    if gpu:
        L.append(f"{gpu['device']}, {gpu['dtype']}.")
        L += [
            "",
            "| mode | text encoder ms | U-Net ms | decoder ms | batch 1 latency s | batch 1 img/s | best batch | best img/s | img/s per batch tried |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        capped = []
        for mode in ("eager", "compiled_reduce_overhead"):
            if mode in gpu:
                g = gpu[mode]
                comp = g["batch1"].get("components", {})
                cells = " | ".join(
                    _f(comp.get(k, {}).get("median_ms"), "{:.2f}") for k in ("text_encoder", "unet", "decoder")
                )
                tried = ", ".join(
                    f"{t['batch']}: OOM" if t.get("out_of_memory") else f"{t['batch']}: {t['images_per_s']:.0f}"
                    for t in g["searched"]
                )
                L.append(
                    f"| {mode} | {cells} | {g['batch1']['end_to_end']['median_s']:.5f} | {g['batch1']['end_to_end']['images_per_s']:.1f} | {g['best_batch']['batch']} | {g['best_batch']['images_per_s']:.1f} | {tried} |"
                )
                last = g["searched"][-1]
                if (
                    last["batch"] == g["best_batch"]["batch"]
                    and not last.get("out_of_memory")
                    and len(g["searched"]) > 1
                ):
                    capped.append(mode)
        from benchmarks.gpu import MAX_BATCH, MIN_GAIN

        L += [
            "",
            f"Batch 1 components are median ms with a device sync after each. The batch search doubles from 1 while images per second grows by {round((MIN_GAIN - 1) * 100)}%, up to {MAX_BATCH}.",
        ]
        if capped:
            L.append(
                f"For {', '.join(capped)} throughput still grew at the largest batch tried: the best batch is the search's cap, and the maximum lies beyond it."
            )
        if "search_wall_s" in gpu.get("compiled_reduce_overhead", {}):
            L.append(
                f"The compiled search took {gpu['compiled_reduce_overhead']['search_wall_s']:.0f} s, compilation and CUDA-graph capture included."
            )
    else:
        L.append(report.get("gpu_status", "no CUDA device: not measured"))
    return L


# ---- chart ---------------------------------------------------------------------------------------------
def chart_png(report: dict) -> bytes:
    """Stacked per-component bars (median ms) per measured path, and the teacher projection beside the
    one-step model; PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"text_encoder": "#4c72b0", "unet": "#dd8452", "decoder": "#55a868", "other": "#8c8c8c"}
    ok = [r for r in report["paths"] if r["status"] == "ok"]
    t = report["baselines"].get("teacher")
    has_teacher = bool(t and t.get("status") == "ok" and report["baselines"].get("one_step_same_method"))
    fig, axes = plt.subplots(
        1, 2 if has_teacher else 1, figsize=(13 if has_teacher else 8, 1.2 + 0.45 * max(len(ok), 3)), squeeze=False
    )
    ax = axes[0][0]
    names = [r["name"] for r in ok]
    left = [0.0] * len(ok)
    for c in (*COMPONENTS, "other"):
        if c == "other":
            vals = [other_ms(r) for r in ok]
        else:
            vals = [med(r, c) or 0.0 for r in ok]
        ax.barh(names, vals, left=left, color=colors[c], label=LABELS[c])
        left = [a + b for a, b in zip(left, vals)]
    for i, total in enumerate(left):
        ax.text(total, i, f" {total:.0f}" if total >= 100 else f" {total:.3g}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per image (median)")
    cfg = report["config"]
    ax.set_title(f"{report['model']['name']} {cfg['resolution']}px, {cfg['threads']} threads")
    ax.legend(fontsize=7, loc="lower right")
    if has_teacher:
        ax2 = axes[0][1]
        sd = report["baselines"]["one_step_same_method"]
        one, multi = t["projection"]["one_step"], t["projection"]["cfg"]
        rows = [
            (f"{report['model']['name']} 1 step", sd),
            (f"{t['model']} 1 step", one),
            (f"{t['model']} {multi['steps']} steps + CFG", multi),
        ]
        left = [0.0] * 3
        for c in COMPONENTS:
            vals = [r[f"{c}_ms"] / 1000 for _, r in rows]
            ax2.barh([n for n, _ in rows], vals, left=left, color=colors[c], label=LABELS[c])
            left = [a + b for a, b in zip(left, vals)]
        for i, total in enumerate(left):
            ax2.text(total, i, f" {total:.3g} s", va="center", fontsize=7)
        ax2.invert_yaxis()
        ax2.set_xlabel("seconds per image (torch eager fp32, component medians x calls)")
        ax2.set_title("one step vs the teacher architecture")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
