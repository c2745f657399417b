"""Benchmarks: one real run on the tiny preset (torch + onnxruntime, fp32 + int8, tiny-teacher baseline)
checked for every field, its files, and ratios recomputed from its own measured numbers; request
errors; the OpenVINO "not installed" row; the GPU batch search exercised on CPU."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench
from benchmarks import report as R
from benchmarks.jobs import BenchError
from sdxs_edge import cpu

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("text_encoder", "unet", "decoder")
# Ratios are stored rounded to 4 decimals from the unrounded-in-JSON figures they cite.
REL = 1e-3


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    rep = bench.run_bench(
        "tiny",
        runtimes=["torch", "onnxruntime"],
        precisions=["fp32", "int8"],
        resolution=64,
        runs=2,
        warmup=1,
        threads=2,
        out_dir=tmp / "out",
        baselines=True,
        openvino=False,
        teacher="tiny-teacher",
        work_dir=tmp / "work",
        progress=False,
    )
    return rep, tmp


def _row(rep, name):
    return next(r for r in rep["paths"] if r["name"] == name)


def test_report_has_every_field(tiny_report):
    rep, _ = tiny_report
    for key in (
        "format",
        "config",
        "machine",
        "model",
        "conversions",
        "paths",
        "baselines",
        "gpu",
        "gpu_status",
        "ratios",
        "where_the_time_goes",
        "files",
        "failed",
        "warnings",
    ):
        assert key in rep, key
    assert rep["failed"] == [], rep["failed"]
    m = rep["machine"]
    assert m["cpu_model"] and m["logical_cores"] >= 1 and m["usable_cores"] >= 1
    if m["flags_source"] == "/proc/cpuinfo":
        for f in ("avx2", "avx512f", "avx512_vnni"):
            assert isinstance(m["flags"][f], bool)
    for lib in ("torch", "onnxruntime", "diffusers", "numpy"):
        assert m["libraries"][lib], lib

    names = [r["name"] for r in rep["paths"]]
    assert names[:4] == ["torch eager fp32", "torch int8", "onnxruntime fp32", "onnxruntime int8"]
    assert _row(rep, "torch int8")["status"] == "not applicable"
    ov = _row(rep, "openvino")
    assert ov["status"] == "skipped" and ov["reason"] == "--no-openvino"
    for name in ("torch eager fp32", "onnxruntime fp32", "onnxruntime int8"):
        r = _row(rep, name)
        assert r["status"] == "ok", r
        assert r["load_s"] > 0 and r["first_run_s"] > 0 and r["peak_rss_mb"] > 0
        for c in COMPONENTS:
            s = r["components"][c]
            assert s["runs"] == 2 and 0 < s["min_ms"] <= s["median_ms"] <= s["p90_ms"]
        e = r["end_to_end"]
        assert e["runs"] == 2 and 0 < e["median_s"] <= e["p90_s"]
        assert e["images_per_s"] == pytest.approx(1 / e["median_s"], rel=REL)
        # Pinned to --threads and read back from the backend itself.
        assert list(r["threads"].values()) == [2], r["threads"]
    for name in ("onnxruntime fp32", "onnxruntime int8"):
        r = _row(rep, name)
        assert r["bundle_mb"] > 0 and r["conversion_s"] > 0
        assert set(r["parity"]["components"]) == set(COMPONENTS)
        assert Path(r["bundle"], "manifest.json").is_file()
    assert _row(rep, "onnxruntime int8")["parity"]["image_psnr_db"] is not None
    assert {(c["target"], c["precision"]) for c in rep["conversions"]} == {("onnx", "fp32"), ("onnx", "int8")}

    t = rep["baselines"]["teacher"]
    assert t["status"] == "ok" and t["model"] == "tiny-teacher"
    assert set(t["components"]) == {"text_encoder", "unet_batch1", "unet_batch2_cfg", "decoder"}
    assert t["projection"]["cfg"]["steps"] == 25 and t["projection"]["cfg"]["unet_batch"] == 2
    assert rep["gpu_status"] in ("measured", "no CUDA device: GPU figures not measured")
    assert rep["where_the_time_goes"] and all(isinstance(s, str) for s in rep["where_the_time_goes"])


def test_files_written(tiny_report):
    rep, tmp = tiny_report
    files = {k: Path(v) for k, v in rep["files"].items()}
    assert files["json"].parent == tmp / "out"
    assert json.loads(files["json"].read_text()) == json.loads(json.dumps(rep))
    assert files["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["markdown"].read_text()
    for text in (
        "| torch eager fp32 | ok |",
        "| onnxruntime int8 | ok |",
        "openvino | skipped: --no-openvino",
        "## Ratios",
        "## Where the time goes",
        "tiny-teacher, 25 steps",
    ):
        assert text in md, text
    assert not list((tmp / "out").glob(".*tmp*")), "temporary files left behind"


def test_ratios_recomputed_from_measured_numbers(tiny_report):
    rep, _ = tiny_report
    torch_e2e = _row(rep, "torch eager fp32")["end_to_end"]["median_s"]
    int8 = [r for r in rep["paths"] if r["precision"] == "int8" and r["status"] == "ok" and r["runtime"] != "openvino"]
    fastest = min(int8, key=lambda r: r["end_to_end"]["median_s"])
    r = rep["ratios"]["fastest_int8_vs_torch_eager_fp32"]
    assert r["denominator"]["path"] == fastest["name"]
    assert r["value"] == pytest.approx(torch_e2e / fastest["end_to_end"]["median_s"], rel=REL)

    r = rep["ratios"]["fastest_int8_peak_rss_over_bundle"]
    assert r["value"] == pytest.approx(fastest["peak_rss_mb"] / fastest["bundle_mb"], rel=REL)

    # The guided teacher total from its own component medians, against the one-step model's.
    t = rep["baselines"]["teacher"]["components"]
    teacher_s = (
        2 * t["text_encoder"]["median_ms"] + 25 * t["unet_batch2_cfg"]["median_ms"] + t["decoder"]["median_ms"]
    ) / 1000
    sdxs_s = sum(_row(rep, "torch eager fp32")["components"][c]["median_ms"] for c in COMPONENTS) / 1000
    assert rep["ratios"]["one_step_vs_teacher_cfg"]["value"] == pytest.approx(teacher_s / sdxs_s, rel=REL)

    r = rep["ratios"]["fastest_int8_vs_openvino_best"]
    assert r["value"] is None and "OpenVINO" in r["why"]


def test_peak_rss_is_per_process(tiny_report):
    # ONNX Runtime workers never import PyTorch: a peak RSS polluted by the torch measurement (same
    # process, or the parent's) could not be this far below it.
    rep, _ = tiny_report
    torch_rss = _row(rep, "torch eager fp32")["peak_rss_mb"]
    for name in ("onnxruntime fp32", "onnxruntime int8"):
        assert _row(rep, name)["peak_rss_mb"] < 0.6 * torch_rss


def test_openvino_not_installed_is_a_row(monkeypatch, tiny_report):
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    state = bench.openvino_state(True)
    assert state["status"] == "not installed" and state["precisions"] == []
    assert state["reason"] == "openvino: not installed (pip install '.[bench]')"
    rep, _ = tiny_report
    paths = [r for r in rep["paths"] if r["runtime"] != "openvino"]
    paths.append(
        bench._path_row("openvino", "openvino", "-", "baseline", status=state["status"], reason=state["reason"])
    )
    md = R.markdown({**rep, "paths": paths})
    assert "| openvino | not installed: openvino: not installed (pip install '.[bench]') |" in md


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"runtimes": "torch,bogus"}, "runtime 'bogus' cannot be benchmarked"),
        ({"runtimes": "openvino"}, "openvino is a baseline"),
        ({"precisions": "fp32,int4"}, "unknown precision 'int4'"),
        ({"resolution": 60}, "positive multiple of 8"),
        ({"resolution": 72}, "multiple of 16 for tiny"),
        ({"runs": 0}, "runs must be >= 1"),
        ({"rounds": 0}, "rounds must be >= 1"),
        ({"teacher": "no-such-model"}, "no preset or model folder named 'no-such-model'"),
    ],
)
def test_bad_requests_fail_before_any_work(tmp_path, kwargs, message):
    args = {
        "runtimes": "torch",
        "precisions": "fp32",
        "resolution": 64,
        "runs": 1,
        "work_dir": tmp_path / "work",
        "out_dir": tmp_path / "out",
        "progress": False,
        **kwargs,
    }
    with pytest.raises(BenchError, match=message):
        bench.run_bench("tiny", **args)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_cli_hook_and_one_line_error():
    p = argparse.ArgumentParser()
    from benchmarks.cli import add_parsers, cmd_bench

    add_parsers(p.add_subparsers(dest="command"))
    a = p.parse_args(["bench", "tiny", "--resolution", "64", "--runs", "3", "--no-openvino"])
    assert (a.func, a.model, a.resolution, a.runs, a.rounds, a.no_openvino, a.no_baselines) == (
        cmd_bench,
        "tiny",
        64,
        3,
        1,
        True,
        False,
    )
    assert a.runtimes == "torch,onnxruntime,executorch,executorch-native" and a.precisions == "fp32,fp16,int8"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "tiny", "--runtimes", "bogus"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: runtime 'bogus'") and len(proc.stderr.strip().splitlines()) == 1


def test_gpu_batch_search_logic_on_cpu():
    # The CUDA path cannot run here; its measuring and batch-search code runs on CPU in fp32 eager.
    from benchmarks.gpu import gpu_figures
    from sdxs_edge.pipeline import SDXSPipeline

    g = gpu_figures(
        SDXSPipeline.load("tiny"), 64, runs=1, warmup=0, device="cpu", dtype="float32", compile=False, max_batch=4
    )
    s = g["eager"]
    assert s["searched"][0]["batch"] == 1 and [x["batch"] for x in s["searched"]] == [
        2**i for i in range(len(s["searched"]))
    ]
    assert s["best_batch"]["images_per_s"] == max(x["images_per_s"] for x in s["searched"] if "images_per_s" in x)
    assert set(s["batch1"]["components"]) == set(COMPONENTS) and math.isfinite(s["batch1"]["end_to_end"]["median_s"])


@pytest.mark.slow
def test_openvino_and_executorch_paths(tmp_path):
    """Slow (OpenVINO NNCF int8 calibration and ExecuTorch lowering take minutes on two cores)."""
    pytest.importorskip("openvino", reason="the bench extra (openvino) is not installed")
    pytest.importorskip("nncf", reason="the bench extra (nncf) is not installed")
    pytest.importorskip("executorch", reason="the executorch extra is not installed")
    rep = bench.run_bench(
        "tiny",
        ["executorch"],
        ["fp32", "int8"],
        64,
        2,
        1,
        2,
        tmp_path / "out",
        True,
        True,
        teacher="tiny-teacher",
        work_dir=tmp_path / "work",
        progress=False,
    )
    assert rep["failed"] == [], rep["failed"]
    for name in ("executorch fp32", "executorch int8", "openvino fp32", "openvino int8"):
        assert _row(rep, name)["status"] == "ok"
    assert _row(rep, "executorch fp32")["threads"] == {"threadpool_threads": 2}
    r = rep["ratios"]["fastest_int8_vs_openvino_best"]
    ov_best = min(_row(rep, n)["end_to_end"]["median_s"] for n in ("openvino fp32", "openvino int8"))
    assert r["value"] == pytest.approx(ov_best / _row(rep, "executorch int8")["end_to_end"]["median_s"], rel=REL)


def test_profile_breaks_components_down_by_operator(tiny_report, tmp_path):
    from benchmarks import profile
    from converters.api import convert

    rep, tmp = tiny_report
    onnx_bundle = next((tmp / "work").rglob("onnx-int8"))
    r = profile.profile_bundle(onnx_bundle, ["unet"], runs=2)
    ops = {o["op"]: o for o in r["components"]["unet"]["ops"]}
    assert "QLinearConv" in ops or "ConvInteger" in ops, sorted(ops)
    assert r["components"]["unet"]["total_ms"] >= sum(o["ms"] for o in ops.values()) * 0.5 > 0

    et_bundle = convert("tiny", "executorch", "fp32", tmp_path / "pte", components=("decoder",), progress=False)
    r = profile.profile_bundle(et_bundle, runs=2)
    d = r["components"]["decoder"]
    assert d["partitions"] == 1 and d["portable_ms"] < d["delegated_ms"]  # the rewrites keep it in XNNPACK
    assert any(o["op"].startswith("Convolution (NHWC, F32)") for o in d["ops"]), d["ops"]
    assert "## decoder" in profile.render(r, top=3)

    assert profile.main([str(et_bundle), "--components", "vae"]) == 2  # one-line error, non-zero exit


def test_profiles_of_two_engines_read_side_by_side_by_operator_class():
    from benchmarks import profile

    assert [
        profile.operator_class(n)
        for n in (
            "Convolution (NHWC, QC8) IGEMM",
            "Convert (NC, F32, QD8)",
            "QLinearConv",
            "FullyConnected (brgemm_avx512_I8)",
            "FullyConnectedQuantizedLegacy (brgemm_avx512_i8)",
            "DequantizeLinear",
            "Subgraph (jit_avx512_FP32)",
            "Reorder (ref_any_I8)",
            "Interpolate (ref)",
        )
    ] == [
        "convolution",
        "quantize and convert",
        "convolution",
        "matrix multiply",
        "matrix multiply",
        "quantize and convert",
        "elementwise and normalization",
        "layout and copies",
        "other",
    ]
    et = {"bundle": "a/executorch-int8", "target": "executorch", "precision": "int8", "components": {}}
    et["components"]["unet"] = {
        "ops": [{"op": "Convolution (NHWC, QC8) IGEMM", "ms": 6.0}, {"op": "Transpose", "ms": 2.0}]
    }
    ov = {"bundle": "b/openvino-int8", "target": "openvino", "precision": "int8", "components": {}}
    ov["components"]["unet"] = {"ops": [{"op": "Convolution (brgconv_avx512_I8)", "ms": 5.0}]}
    ov["components"]["decoder"] = {"ops": []}  # only in one report: left out
    text = profile.render_classes([et, ov])
    assert "| convolution | 6.0 (75%) | 5.0 (100%) |" in text
    assert "| layout and copies | 2.0 (25%) | 0.0 (0%) |" in text and "| total | 8.0 | 5.0 |" in text
    assert "## decoder" not in text


def test_profile_reads_openvino_ir_by_layer_type_and_kernel(tiny_report, tmp_path):
    """An OpenVINO IR folder (the bench's baseline) profiles with the CPU plugin's own per-layer counters."""
    pytest.importorskip("openvino", reason="the bench extra (openvino) is not installed")
    from benchmarks import openvino_backend, profile

    _, tmp = tiny_report
    onnx32 = next((tmp / "work").rglob("onnx-fp32"))
    ir = openvino_backend.convert(onnx32, "fp32", tmp_path / "openvino-fp32", "tiny", 64)
    r = profile.profile_bundle(ir, runs=2)
    assert r["target"] == "openvino" and set(r["components"]) == {"text_encoder", "unet", "decoder"}
    u = r["components"]["unet"]
    assert any(o["op"].startswith("Convolution (") for o in u["ops"]), u["ops"]
    assert u["total_ms"] == pytest.approx(sum(o["ms"] for o in u["ops"]), rel=0.01) and u["total_ms"] > 0
    assert "## unet" in profile.render(r, top=3)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the host runner needs g++")
def test_native_runner_measures_each_component_without_torch(tmp_path):
    from benchmarks import native_runner
    from converters.api import convert

    subprocess.run([str(ROOT / "runtimes" / "native" / "build_host.sh")], check=True, capture_output=True)
    bundle = convert(
        "tiny", "executorch", "fp32", tmp_path / "pte", components=("text_encoder", "decoder"), progress=False
    )
    r = native_runner.measure(bundle, runs=2)
    assert set(r["components"]) == {"text_encoder", "decoder"}
    for c in r["components"].values():
        assert len(c["samples_ms"]) == 2 and c["median_ms"] > 0 and c["load_ms"] > 0
        assert 1 < c["peak_rss_mb"] < 300  # the runner alone: no torch (which is 219 MB by itself)
    assert r["peak_rss_mb"]["sum_of_components"] >= r["peak_rss_mb"]["largest_component"]
    assert "Sum of the component medians" in native_runner.render(r)
    onnx = convert("tiny", "onnx", "fp32", tmp_path / "onnx", components=("decoder",), progress=False)
    assert native_runner.main([str(onnx)]) == 2  # not an ExecuTorch bundle: one-line error


@pytest.mark.heavy
@pytest.mark.skipif(shutil.which("g++") is None, reason="the host runner needs g++")
def test_executorch_native_path_counts_both_processes(tmp_path):
    """The executorch-native row: the runner built by the run, pinned threads read back from it, and a
    peak RSS that is the torch-free driver plus the runner (not the driver alone)."""
    pytest.importorskip("executorch", reason="the executorch extra is not installed")
    rep = bench.run_bench(
        "tiny",
        ["executorch-native"],
        ["fp32"],
        64,
        2,
        1,
        2,
        tmp_path / "out",
        False,
        False,
        work_dir=tmp_path / "work",
        rounds=2,
        progress=False,
    )
    assert rep["failed"] == [], rep["failed"]
    r = _row(rep, "executorch-native fp32")
    assert r["status"] == "ok" and r["threads"] == {"threadpool_threads": 2}
    assert (
        r["rounds"] == 2 and r["end_to_end"]["runs"] == 4 and len(r["end_to_end"]["round_medians_s"]) == 2
    )  # two processes, runs pooled
    assert "2 rounds, round-robin" in Path(rep["files"]["markdown"]).read_text()
    run = r["runner"]
    assert (
        run["workspace_sharing"] == "global"
        and set(run["execute_ms"]) == set(COMPONENTS)
        and set(run["load_ms"]) == set(COMPONENTS)
    )
    assert run["execute_ms"]["unet"]["runs"] == 4
    for c in COMPONENTS:  # the runner's own execute time sits inside the round trip the session timed
        assert 0 < run["execute_ms"][c]["median_ms"] <= r["components"][c]["median_ms"]
    assert (
        0 < run["peak_rss_mb"] < 200 and 0 < r["driver_peak_rss_mb"] < 200
    )  # neither process holds PyTorch (219 MB alone)
    assert r["peak_rss_mb"] == pytest.approx(run["peak_rss_mb"] + r["driver_peak_rss_mb"], abs=0.11)
    md = Path(rep["files"]["markdown"]).read_text()
    assert f"runner {run['peak_rss_mb']:.0f} MB + driver {r['driver_peak_rss_mb']:.0f} MB" in md


def test_rounds_pool_every_run_of_every_round():
    """merge_rounds: samples pooled, statistics recomputed over them, per-round medians kept, peak memory
    the largest round's, and a failed round makes the row a failure."""
    from benchmarks.jobs import stats_e2e, stats_ms

    def row(comp_s, e2e_s, rss, load):
        return {
            "name": "p",
            "status": "ok",
            "load_s": load,
            "first_run_s": 1.0,
            "peak_rss_mb": rss,
            "process_wall_s": 2.0,
            "components": {c: stats_ms(comp_s) for c in COMPONENTS},
            "other": stats_ms([0.001] * len(e2e_s)),
            "end_to_end": stats_e2e(e2e_s),
        }

    a, b = row([0.10, 0.12], [0.30, 0.32], 500, 1.0), row([0.20, 0.22], [0.50, 0.52], 700, 3.0)
    m = bench.merge_rounds([a, b])
    assert m["rounds"] == 2 and m["peak_rss_mb"] == 700 and m["load_s"] == 2.0 and m["process_wall_s"] == 4.0
    assert m["components"]["unet"]["runs"] == 4 and m["components"]["unet"]["median_ms"] == pytest.approx(160.0)
    assert m["end_to_end"]["samples_s"] == [0.30, 0.32, 0.50, 0.52] and m["end_to_end"]["median_s"] == pytest.approx(
        0.41
    )
    assert m["end_to_end"]["round_medians_s"] == [0.31, 0.51]
    assert bench.merge_rounds([a]) is a
    failed = bench.merge_rounds([a, {"name": "p", "status": "error", "reason": "worker exited 1"}])
    assert failed["status"] == "error" and failed["rounds"] == 2


def test_gpu_graph_chain_is_the_pipelines_one_step_image():
    # The function the CUDA graph captures is the pipeline's own one-step chain, up to uint8 rounding.
    import torch

    from benchmarks.gpu_graph import chain
    from sdxs_edge.components import wrappers
    from sdxs_edge.pipeline import SDXSPipeline

    pipe = SDXSPipeline.load("tiny")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle", "a blue square"]
    with torch.inference_mode():
        got = chain(wrappers(pipe), pipe.one_step_constants(), torch.float32)(pipe.tokenize(prompts).to(torch.int32), z)
    ref = pipe.generate(prompts, noise=z, output="tensor").images
    ref = ((ref + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert got.shape == ref.shape == (2, 64, 64, 3) and got.dtype == torch.uint8
    assert (got.int() - ref.int()).abs().max() <= 1


def test_gpu_graph_report_names_every_variant_and_the_batch_search():
    from benchmarks.gpu_graph import render

    b1 = {"batch": 1, "ms_per_call": 3.2, "images_per_s": 312.5, "build_s": 80.0}
    res = {
        "model": "sdxs-512",
        "resolution": 512,
        "device": "NVIDIA H200",
        "torch": "2.11.0",
        "dtype": "float16",
        "wall_s": 290.0,
        "variants": {
            "eager": {"status": "failed: RuntimeError: capture"},
            "inductor": {
                "status": "ok",
                "batch1": b1,
                "psnr_vs_fp32_eager_db": 41.5,
                "components_ms": {"text_encoder": 0.5, "unet": 2.0, "decoder": 0.6},
                "batches": [b1, {"batch": 2, "images_per_s": 500.0}, {"batch": 4, "out_of_memory": True}],
            },
            "inductor-max-autotune": {"status": "skipped: 40 s of the budget left"},
        },
        "headline": {"variant": "inductor", **b1},
        "best_batch": {"variant": "inductor", "batch": 2, "images_per_s": 500.0},
    }
    md = render(res)
    assert "| eager | failed: RuntimeError: capture |" in md and "skipped: 40 s" in md
    assert "**312.5 images/s**" in md and "0.500 / 2.000 / 0.600" in md
    assert "**500 images/s** at batch 2" in md and "1: 312, 2: 500, 4: OOM" in md


def test_real_size_smoke_reports_every_stage(tmp_path):
    # The real-size smoke's code on the tiny teacher: every training stage timed from its own log.
    from benchmarks.real_size_smoke import STAGES, run

    res = run("tiny-teacher", 64, steps=3, out=tmp_path / "run", report=tmp_path / "smoke", threads=2)
    assert [r["stage"] for r in res["stages"]] == list(STAGES)
    for r in res["stages"]:
        assert r["steps"] == 3 and r["step_s"] > 0 and r["images_per_s"] == round(r["batch"] / r["step_s"], 2)
        assert r["wall_s"] > 0 and r["peak_gpu_mib"] is None  # no CUDA here
    assert res["pairs_seconds"] > 0 and res["unet_params"]["one-step"] > 0
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["stages"] == res["stages"] and "| unet-kd | 4 |" in (tmp_path / "smoke.md").read_text()


def test_committed_gpu_figures_are_the_ones_the_docs_quote():
    """The H200 figures in README, docs/benchmarks.md and docs/any-teacher.md are those of the committed
    result files (written by `benchmarks.gpu_graph` and `benchmarks.real_size_smoke`)."""
    graph = json.loads((ROOT / "benchmarks/results/sdxs-512-512-h200/graph.json").read_text())
    bench_doc, readme = (ROOT / "docs/benchmarks.md").read_text(), (ROOT / "README.md").read_text()
    head, best = graph["headline"], graph["best_batch"]
    assert graph["device"] == "NVIDIA H200" and head["variant"] == "inductor"
    for text in (bench_doc, readme):
        assert f"**{head['images_per_s']} images per second**" in text
        assert f"{round(best['images_per_s'])} at batch {best['batch']}" in text
    for name, v in graph["variants"].items():
        if v["status"] == "ok":
            comp = " / ".join(f"{v['components_ms'][k]:.3f}" for k in ("text_encoder", "unet", "decoder"))
            assert f"| {name} | {v['batch1']['ms_per_call']:.3f} |" in bench_doc and comp in bench_doc
    smoke = json.loads((ROOT / "models/reports/real-size-smoke.json").read_text())
    teacher_doc = (ROOT / "docs/any-teacher.md").read_text()
    assert smoke["machine"]["gpu"] == "NVIDIA H200"
    for s in smoke["stages"]:
        assert (
            f"| {s['stage']} | {s['batch']} | {'yes' if s['checkpointing'] else 'no'} | {s['step_s']} |" in teacher_doc
        )
        assert f"{round(s['peak_gpu_mib']):,} |" in teacher_doc


def test_conversion_cost_runs_as_documented(tmp_path):
    """`python -m benchmarks.convert_real_size` (its worker too) runs with the repository's `benchmarks/`
    folder holding a module named `profile`, as the standard library has one, and records its row: an
    int8 conversion measures every sensitivity score, as a first conversion does, and caches none."""
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.convert_real_size", "--preset", "tiny", "--jobs", "onnx:int8"]
        + ["--work", str(tmp_path / "work"), "--results", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SDXS_EDGE_CACHE": str(cache)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "conversion_tiny.json").read_text())
    (row,) = report["results"]
    assert "error" not in row and row["snr_db"], row
    assert report["host"]["cpu_class"] == cpu.host_class()
    assert row["sensitivity_cache"] == "off" and row["sensitivity_scores"], row
    assert all(c["scores_measured"] > 0 for c in row["sensitivity_scores"].values()), row
    assert not (cache / "sensitivity").exists()
