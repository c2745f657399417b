"""CPU classes: detection, the int8 form that holds on every class, and the conversion check run as another
class under qemu (an AVX2-only CPU emulated with `qemu-x86_64-static -cpu Haswell`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdxs_edge import cpu
from sdxs_edge.errors import SDXSError


@pytest.mark.parametrize(
    ("machine", "flags", "cls"),
    [
        ("x86_64", {"avx2", "fma", "avx512f", "avx512_vnni"}, "x86-64-avx512-vnni"),
        ("x86_64", {"avx2", "fma", "avx_vnni"}, "x86-64-avx-vnni"),
        ("x86_64", {"avx2", "fma", "f16c"}, "x86-64-avx2"),
        ("x86_64", {"sse4_2"}, "x86-64-sse"),
        ("aarch64", {"asimd", "asimddp"}, "arm64"),
    ],
)
def test_classify(machine, flags, cls):
    assert cpu.classify(machine, flags) == cls


def test_host_class_is_a_known_class():
    assert cpu.host_class() in cpu.CLASSES
    assert cpu.parse_classes("host") == (cpu.host_class(),)
    assert cpu.emulator(cpu.host_class()) == []


def test_bad_class_requests_are_one_line_errors(monkeypatch):
    with pytest.raises(cpu.CpuClassError, match="unknown CPU class 'avx9'"):
        cpu.parse_classes("host,avx9")
    monkeypatch.setattr(cpu, "host_class", lambda: "x86-64-avx2")
    with pytest.raises(cpu.CpuClassError, match="only be checked on such a machine"):
        cpu.emulator("x86-64-avx512-vnni")
    monkeypatch.setattr(cpu.shutil, "which", lambda _name: None)
    with pytest.raises(cpu.CpuClassError, match="apt-get install qemu-user-static"):
        cpu.emulator("arm64")


def test_onnx_int8_uses_uint8_weights():
    """u8 x s8 products saturate on AVX2 without VNNI (vpmaddubsw); the static and dynamic int8 forms take
    uint8 weights, which every CPU class multiplies exactly."""
    import onnxruntime.quantization as oq

    from converters import to_onnx

    assert to_onnx.INT8_FORM == "u8u8"
    seen = {}
    job = type("Job", (), {"out": Path("/nonexistent/x.onnx")})()
    orig = oq.quantize_dynamic
    try:
        oq.quantize_dynamic = lambda *a, **kw: seen.update(kw) or (_ for _ in ()).throw(RuntimeError("stop"))
        with pytest.raises(RuntimeError, match="stop"):
            to_onnx.quantize_dynamic(job, Path(__file__))
    finally:
        oq.quantize_dynamic = orig
    assert seen["weight_type"] == oq.QuantType.QUInt8


@pytest.fixture(scope="module")
def tiny_onnx_int8(tmp_path_factory):
    """The tiny model's ONNX int8 bundle, checked natively and (pretending the host has VNNI) as an
    AVX2-only CPU under qemu."""
    if shutil.which(cpu.EMULATED["x86-64-avx2"][0]) is None:
        pytest.skip("qemu-user-static is not installed (the Makefile installs it)")
    if not cpu.host_class().startswith("x86-64"):
        pytest.skip("x86-64 emulation is checked on x86-64 hosts")
    from converters.api import convert

    mp = pytest.MonkeyPatch()
    mp.setattr(cpu, "host_class", lambda: "x86-64-avx512-vnni")
    try:
        out = convert(
            "tiny",
            "onnx",
            "int8",
            tmp_path_factory.mktemp("b") / "bundle",
            progress=False,
            cpu_classes=("host", "x86-64-avx2"),
        )
    finally:
        mp.undo()
    return out


def test_conversion_checks_each_class_and_records_it(tiny_onnx_int8):
    m = json.loads((tiny_onnx_int8 / "manifest.json").read_text())
    assert m["conversion"]["components"]["unet"]["int8"]["form"] == "u8u8"
    recs = {r["class"]: r for r in m["parity"]["cpu_classes"]}
    assert list(recs) == ["x86-64-avx512-vnni", "x86-64-avx2"]
    assert recs["x86-64-avx512-vnni"]["how"] == "native"
    assert recs["x86-64-avx2"]["how"] == "qemu-x86_64-static -cpu Haswell"
    floor = m["parity"]["components"]["unet"]["floor_snr_db"]
    for name, native in recs["x86-64-avx512-vnni"]["components"].items():
        emulated = recs["x86-64-avx2"]["components"][name]
        assert emulated["snr_db"] >= floor and emulated["samples"] == native["samples"]
    assert cpu.checked_classes(m) == ["x86-64-avx512-vnni", "x86-64-avx2"]


def test_emulated_side_runs_the_components(tiny_onnx_int8, tmp_path):
    """`python -m converters.cpu_check` as the emulated process runs it (here natively): the same outputs
    as a session in this process."""
    import runtimes
    from converters import cpu_check

    with runtimes.load(tiny_onnx_int8, "onnxruntime") as s:
        spec = s.specs["decoder"].inputs[0]
        x = np.random.default_rng(0).standard_normal(spec.shape).astype(spec.dtype)
        inputs = {"decoder": [(x,)]}
        direct = cpu_check.run_components(s, inputs)
    np.savez(tmp_path / "inputs.npz", **cpu_check._flatten(inputs))
    assert cpu_check.main([str(tiny_onnx_int8), "onnxruntime", str(tmp_path)]) == 0
    with np.load(tmp_path / "outputs.npz") as z:
        got = cpu_check._unflatten(dict(z))
    np.testing.assert_array_equal(got["decoder"][0][0], direct["decoder"][0][0])


def test_unchecked_class_warns_once(tiny_onnx_int8, capsys, monkeypatch):
    import runtimes
    from runtimes import base

    monkeypatch.setattr(base, "_WARNED", set())
    monkeypatch.setattr(cpu, "host_class", lambda: "x86-64-avx2")
    with runtimes.load(tiny_onnx_int8, "onnxruntime"):
        pass
    assert capsys.readouterr().err == ""  # checked on this class
    monkeypatch.setattr(cpu, "host_class", lambda: "x86-64-sse")
    for _ in range(2):
        with runtimes.load(tiny_onnx_int8, "onnxruntime"):
            pass
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unchecked" in err[0] and "x86-64-sse" in err[0]


def test_arm64_check_refuses_onnx_bundles(tiny_onnx_int8):
    from converters.cpu_check import _emulated_outputs

    with pytest.raises(SDXSError, match="cannot be checked as arm64"):
        _emulated_outputs(tiny_onnx_int8, "onnx", "arm64", ["qemu-aarch64-static"], {})
