"""Where a bundle's time goes, operator by operator: `python -m benchmarks.profile BUNDLE`.

Runs each component of an ExecuTorch or ONNX bundle on random inputs of its manifest's shapes and sums
the runtime's own per-operator timings:
- ExecuTorch: ETDump (`enable_etdump`), read with `executorch.devtools.Inspector`. XNNPACK reports its
  own operators inside each delegate call ("Convolution (NHWC, QC8) IGEMM", ...); `portable` is the time
  in operators outside any delegate, `partitions` the number of delegate calls per run.
- ONNX Runtime: the session profiler's per-node kernel times, by operator type.
- OpenVINO (an IR folder `benchmarks.openvino_backend.convert` wrote, e.g. the NNCF int8 baseline of
  `sdxs-edge bench`): the CPU plugin's own per-layer counters (`PERF_COUNT`), summed by layer type and
  the kernel it ran ("Convolution (brgconv_avx512_I8)"); fused layers report under the layer they fused into.
Figures are milliseconds per run (median over runs for ExecuTorch, mean for ONNX Runtime), with the
profilers' own overhead included: compare them with each other, not with `sdxs-edge bench`.

    python -m benchmarks.profile out/bench/sdxs-512-512/bundles/executorch-int8 --components unet
    python -m benchmarks.profile out/onnx-int8 --top 10 --json profile.json
    python -m benchmarks.profile out/bench/sdxs-512-512/bundles/openvino-int8 --components unet

Given several bundles, it also sums each component's time by operator class (`CLASSES`: quantize and
convert, convolution, matrix multiply, softmax, layout and copies, elementwise and normalization), one
column per bundle, so two engines' profiles read side by side.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from sdxs_edge.atomic import write_atomic
from sdxs_edge.errors import SDXSError

CONTAINERS = ("Method::execute", "Method::init", "Program::load_method", "DELEGATE_CALL", "OPERATOR_CALL")


# (operator class, pattern) in order, the first match wins; names are XNNPACK's, ONNX Runtime's and
# OpenVINO's layer types ("Subgraph" is OpenVINO's fused elementwise code).
CLASSES = (
    ("quantize and convert", r"^(dynamic)?(de)?quantize|^fakequantize|^convert"),
    ("convolution", r"conv"),
    ("matrix multiply", r"fully ?connected|matmul|gemm|matrix multipl"),
    ("softmax", r"softmax"),
    ("layout and copies", r"transpose|reorder|copy|concat|slice|split|reshape|permute|gather|depth ?to ?space"),
    (
        "elementwise and normalization",
        r"add|sub|mul|div|eltwise|subgraph|mvn|norm|mean|reduce|sigmoid|gelu|clamp|relu|sqrt",
    ),
)


def operator_class(op: str) -> str:
    """The class of a profiled operator name (`CLASSES`), "other" when none matches."""
    low = op.lower()
    return next((c for c, pattern in CLASSES if re.search(pattern, low)), "other")


def render_classes(reports: list[dict]) -> str:
    """Per component present in every report: ms per run by operator class, one column per report."""
    lines = []
    common = [c for c in reports[0]["components"] if all(c in r["components"] for r in reports)]
    for c in common:
        sums = []
        for r in reports:
            by = collections.Counter()
            for o in r["components"][c]["ops"]:
                by[operator_class(o["op"])] += o["ms"]
            sums.append(by)
        heads = [f"{Path(r['bundle']).name} ({r['target']} {r['precision']})" for r in reports]
        lines += [f"\n## {c}: ms per run by operator class", "", "| class | " + " | ".join(heads) + " |"]
        lines.append("|---|" + "---:|" * len(reports))
        for cls in [name for name, _ in CLASSES] + ["other"]:
            if any(by[cls] for by in sums):
                cells = [f"{by[cls]:.1f} ({100 * by[cls] / (sum(by.values()) or 1):.0f}%)" for by in sums]
                lines.append(f"| {cls} | " + " | ".join(cells) + " |")
        lines.append("| total | " + " | ".join(f"{sum(by.values()):.1f}" for by in sums) + " |")
    return "\n".join(lines) + "\n"


def random_inputs(specs: list[dict], rng: np.random.Generator) -> list[np.ndarray]:
    """Random arrays of a manifest's input specs: token ids for integer inputs, unit Gaussians otherwise."""
    out = []
    for s in specs:
        if s["dtype"].startswith("int"):  # token ids, in CLIP's vocabulary (the only one the pipeline takes)
            out.append(rng.integers(0, 49408, size=s["shape"]).astype(s["dtype"]))
        else:
            out.append(rng.standard_normal(s["shape"]).astype(s["dtype"]))
    return out


def profile_executorch(path: Path, specs: list[dict], runs: int, threads: int) -> dict:
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)
    module = portable_lib._load_for_executorch(str(path), enable_etdump=True)
    feeds = [torch.from_numpy(x) for x in random_inputs(specs, np.random.default_rng(0))]
    for _ in range(1 + runs):  # the first run is a warm-up, dropped below
        module.forward(feeds)
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "profile.etdp"
        module.write_etdump_result_to_file(str(dump))
        inspector = Inspector(etdump_path=str(dump))
    ops: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    totals: collections.Counter = collections.Counter()
    for block in inspector.event_blocks:
        if block.name == "Init":  # loading, not running
            continue
        for ev in block.events:
            if ev.perf_data is None:
                continue
            per_run = float(np.median(ev.perf_data.raw[1:] if len(ev.perf_data.raw) > 1 else ev.perf_data.raw))
            name = ev.name or "?"
            if name in CONTAINERS:
                totals[name] += per_run
                calls[name] += 1
                continue
            key = re.sub(r" #\d+$", "", name).removeprefix("native_call_")
            ops[key] += per_run
            calls[key] += 1
    return {
        "total_ms": totals["Method::execute"],
        "delegated_ms": totals["DELEGATE_CALL"],
        "portable_ms": totals["OPERATOR_CALL"],
        "partitions": calls["DELEGATE_CALL"],
        "ops": [{"op": k, "ms": round(v, 3), "calls": calls[k]} for k, v in ops.most_common()],
    }


def profile_onnxruntime(path: Path, specs: list[dict], runs: int, threads: int) -> dict:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        feeds = dict(zip(names, random_inputs(specs, np.random.default_rng(0))))
        for _ in range(1 + runs):  # the first run is a warm-up, dropped below
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"]
    )
    warm_end = model_runs[0]["ts"] + model_runs[0]["dur"]
    events = [e for e in events if e.get("ts", 0) >= warm_end]
    ops: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    total = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ops[e["args"]["op_name"]] += e["dur"] / 1000 / runs
            calls[e["args"]["op_name"]] += 1
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            total += e["dur"] / 1000 / runs
    return {
        "total_ms": total,
        "ops": [{"op": k, "ms": round(v, 3), "calls": calls[k] // runs} for k, v in ops.most_common()],
    }


def profile_openvino(path: Path, specs: list[dict], runs: int, threads: int) -> dict:
    from benchmarks.openvino_backend import _core_config, _openvino

    ov = _openvino()
    compiled = ov.Core().compile_model(str(path), "CPU", {**_core_config(threads), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    names = [s["name"] for s in specs]
    feeds = dict(zip(names, random_inputs(specs, np.random.default_rng(0))))
    request.infer(feeds)  # warm-up, not counted
    ops: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for _ in range(runs):
        request.infer(feeds)
        for info in request.profiling_info:  # the counters of the last inference
            if info.status != ov.ProfilingInfo.Status.EXECUTED:
                continue
            key = f"{info.node_type} ({info.exec_type})"
            ops[key] += info.real_time.total_seconds() * 1000 / runs
            calls[key] += 1
    return {
        "total_ms": sum(ops.values()),  # the plugin's layer times; it reports no whole-inference figure
        "ops": [{"op": k, "ms": round(v, 3), "calls": calls[k] // runs} for k, v in ops.most_common()],
    }


def _openvino_ir(folder: Path) -> tuple[dict, dict[str, Path]]:
    """(the source ONNX bundle's manifest, {component: IR .xml}) of an OpenVINO IR folder."""
    from benchmarks.openvino_backend import META_FILE
    from sdxs_edge.bundle import REQUIRED_COMPONENTS, load_manifest

    meta = json.loads((folder / META_FILE).read_text())
    manifest = load_manifest(Path(meta["source_bundle"]))
    manifest = {**manifest, "target": "openvino", "precision": meta["precision"]}
    return manifest, {c: folder / f"{c}.xml" for c in REQUIRED_COMPONENTS}


def profile_bundle(bundle: str | Path, components: list[str] | None = None, runs: int = 3, threads: int = 2) -> dict:
    """Per-operator timings of each component of an ExecuTorch or ONNX bundle, or an OpenVINO IR folder.

    Args:
        bundle: a bundle directory written by `sdxs-edge convert` (target executorch or onnx), or an
            OpenVINO IR folder (`benchmarks.openvino_backend.convert`; its source bundle gives the shapes).
        components: which components (default: all in the manifest).
        runs: measured runs after one warm-up.
        threads: threads for the runtime.
    """
    from benchmarks.openvino_backend import META_FILE
    from sdxs_edge.bundle import load_manifest

    bundle = Path(bundle)
    if (bundle / META_FILE).is_file():
        manifest, files = _openvino_ir(bundle)
    else:
        manifest = load_manifest(bundle)
        files = {c: bundle / e["file"] for c, e in manifest["components"].items()}
    target = manifest["target"]
    profilers = {"executorch": profile_executorch, "onnx": profile_onnxruntime, "openvino": profile_openvino}
    if target not in profilers:
        raise SDXSError(f"profile reads executorch and onnx bundles and OpenVINO IR; {bundle} is a {target} bundle")
    if (
        manifest.get("conversion", {}).get("config", {}).get("delegate", "xnnpack") != "xnnpack"
        and target == "executorch"
    ):
        raise SDXSError(f"{bundle} uses the Core ML delegate, which runs only on Apple devices")
    if runs < 1 or threads < 1:
        raise SDXSError("--runs and --threads must be at least 1")
    names = components or list(manifest["components"])
    unknown = [c for c in names if c not in manifest["components"]]
    if unknown:
        raise SDXSError(f"{bundle} has no component {unknown[0]!r}; it has {', '.join(manifest['components'])}")
    run = profilers[target]
    out = {
        "bundle": str(bundle),
        "target": target,
        "precision": manifest["precision"],
        "runs": runs,
        "threads": threads,
        "components": {},
    }
    for c in names:
        out["components"][c] = run(files[c], manifest["components"][c]["inputs"], runs, threads)
    return out


def render(report: dict, top: int) -> str:
    lines = [
        f"# {report['bundle']} ({report['target']} {report['precision']}, {report['threads']} threads, {report['runs']} runs)"
    ]
    for c, r in report["components"].items():
        head = f"\n## {c}: {r['total_ms']:.1f} ms per run"
        if "partitions" in r:
            head += f" ({r['partitions']} delegate calls, {r['delegated_ms']:.1f} ms delegated, {r['portable_ms']:.1f} ms in portable operators)"
        lines += [head, "", "| operator | ms per run | share | calls |", "|---|---:|---:|---:|"]
        total = sum(o["ms"] for o in r["ops"]) or 1.0
        for o in r["ops"][:top]:
            lines.append(f"| {o['op']} | {o['ms']:.2f} | {100 * o['ms'] / total:.1f}% | {o['calls']} |")
        if len(r["ops"]) > top:
            rest = r["ops"][top:]
            lines.append(
                f"| ({len(rest)} more) | {sum(o['ms'] for o in rest):.2f} | {100 * sum(o['ms'] for o in rest) / total:.1f}% | {sum(o['calls'] for o in rest)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="+", help="one or more bundles (several: also a table by operator class)")
    p.add_argument("--components", nargs="+", default=None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15, help="operators listed per component (the rest summed)")
    p.add_argument("--json", default=None, help="also write the full report here")
    a = p.parse_args(argv)
    try:
        reports = [profile_bundle(b, a.components, a.runs, a.threads) for b in a.bundle]
    except SDXSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = "".join(render(r, a.top) for r in reports) + (render_classes(reports) if len(reports) > 1 else "")
    print(text, end="")
    if a.json:
        write_atomic(Path(a.json), json.dumps(reports[0] if len(reports) == 1 else reports, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
