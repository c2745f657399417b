"""Native runtimes: the SDXT tensor files, the arm64-emulated runtime (sdxs_runner under qemu) and the
android runtime (sdxs_runner over adb), with every missing piece as one clear SDXSError.

Slow tests need `make arm64-runner` (build/arm64/sdxs_runner) and ExecuTorch bundles from
`converters.convert`; the device test needs adb, a connected arm64 device and the NDK-built runner.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtimes
from runtimes.base import BackendMissingError
from runtimes.native_io import DTYPE_CODES, RunnerError, TensorFileError, failure_line, read_tensor, write_tensor
from sdxs_edge.bundle import FORMAT, FORMAT_VERSION, sha256_path
from sdxs_edge.metrics import max_abs_error, snr_db

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "build" / "arm64" / "sdxs_runner"
QEMU = ["qemu-aarch64-static", "-cpu", "cortex-a76", "-L", "/usr/aarch64-linux-gnu"]
COMPONENTS = ("text_encoder", "unet", "decoder")


# ---- helpers -----------------------------------------------------------------------------------------
def _fake_bundle(root: Path) -> Path:
    """A manifest-valid executorch bundle whose programs are placeholder bytes (for checks that fail
    before anything runs)."""
    from sdxs_edge.tokenizer import write_clip_tokenizer

    root.mkdir(parents=True)
    write_clip_tokenizer(root / "tokenizer")
    lat = {"name": "latent", "shape": [1, 4, 8, 8], "dtype": "float32"}
    io = {
        "text_encoder": (
            [{"name": "input_ids", "shape": [1, 77], "dtype": "int32"}],
            [{"name": "hidden_states", "shape": [1, 77, 16], "dtype": "float32"}],
        ),
        "unet": (
            [lat, {"name": "context", "shape": [1, 77, 16], "dtype": "float32"}],
            [{"name": "noise_pred", "shape": [1, 4, 8, 8], "dtype": "float32"}],
        ),
        "decoder": ([lat], [{"name": "image", "shape": [1, 3, 64, 64], "dtype": "float32"}]),
    }
    comps = {}
    for name, (ins, outs) in io.items():
        f = root / f"{name}.pte"
        f.write_bytes(b"not a program " + name.encode())
        comps[name] = {"file": f.name, "sha256": sha256_path(f), "inputs": ins, "outputs": outs}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": {"model": "tiny", "sha256": "0" * 64},
        "target": "executorch",
        "precision": "fp32",
        "resolution": 64,
        "sampler": {
            "timestep": 999,
            "sigma": 14.6,
            "input_scale": 1.0,
            "prediction_type": "epsilon",
            "latent_scaling": 1.0,
        },
        "tokenizer": {"dir": "tokenizer", "max_length": 77},
        "components": comps,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# A stand-in for adb: `devices` lists $FAKE_ADB_DEVICES (space separated serials, "serial:state" for
# another state); `shell CMD` runs CMD with sh on this machine; `push`/`pull` copy files. The device's
# file system is this machine's, so `device_dir` must be a local path.
FAKE_ADB = f"""#!{sys.executable}
import os, shutil, subprocess, sys
args = sys.argv[1:]
if args[:1] == ["-s"]:
    args = args[2:]
cmd, rest = args[0], args[1:]
if cmd == "devices":
    print("List of devices attached")
    for d in os.environ.get("FAKE_ADB_DEVICES", "").split():
        serial, _, state = d.partition(":")
        print(f"{{serial}}\\t{{state or 'device'}}")
    print()
elif cmd == "shell":
    sys.exit(subprocess.run(["sh", "-c", rest[0]]).returncode)
elif cmd in ("push", "pull"):
    *srcs, dst = rest
    for s in srcs:
        if not os.path.exists(s):
            print(f"adb: error: failed to stat {{s}}: No such file or directory", file=sys.stderr)
            sys.exit(1)
        shutil.copy(s, os.path.join(dst, os.path.basename(s)) if dst.endswith("/") else dst)
else:
    print(f"fake adb: unknown command {{cmd}}", file=sys.stderr)
    sys.exit(1)
"""


def _elf(interp: bytes | None, machine: int = 183) -> bytes:
    """A minimal 64-bit little-endian ELF executable image with one PT_INTERP program header."""
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<HHI", ehdr, 16, 2, machine, 1)  # e_type EXEC, e_machine, e_version
    struct.pack_into("<Q", ehdr, 32, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 54, 56, 1 if interp else 0)  # e_phentsize, e_phnum
    if not interp:
        return bytes(ehdr)
    phdr = bytearray(56)
    struct.pack_into("<II", phdr, 0, 3, 4)  # PT_INTERP, PF_R
    struct.pack_into("<QQQQQ", phdr, 8, 120, 0, 0, len(interp) + 1, len(interp) + 1)
    return bytes(ehdr) + bytes(phdr) + interp + b"\0"


def _need_runner() -> None:
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("qemu-aarch64-static is not installed (make arm64-runner installs it)")
    if not RUNNER.is_file():
        pytest.skip(f"the arm64 runner {RUNNER.relative_to(ROOT)} is not built (make arm64-runner)")


@pytest.fixture(scope="module")
def et_bundle(tmp_path_factory):
    """precision -> a tiny-preset ExecuTorch (XNNPACK) bundle from converters.convert, built once."""
    cache: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if importlib.util.find_spec("executorch") is None:
            pytest.skip("the executorch package is not installed (pip install 'sdxs-edge[executorch]')")
        try:
            from converters import convert
        except ImportError:
            pytest.skip("converters.convert does not exist in this checkout yet; it makes the ExecuTorch bundles")
        if precision not in cache:
            out = tmp_path_factory.mktemp("et") / f"tiny-executorch-{precision}"
            convert("tiny", target="executorch", precision=precision, out=out, progress=False)
            cache[precision] = out
        return cache[precision]

    return get


# ---- SDXT tensor files (fast) --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(DTYPE_CODES))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (1, 77), (2, 3, 4, 5)])
def test_tensor_file_roundtrip(tmp_path, dtype, shape):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(shape) * 100).astype(dtype)
    b = read_tensor(write_tensor(tmp_path / "t.bin", a))
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_tensor_file_layout_is_the_documented_one(tmp_path):
    """Byte for byte what runner.cpp's header comment specifies (it reads and writes the same bytes)."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::-1]  # non-contiguous: written C-contiguous
    raw = write_tensor(tmp_path / "t.bin", a).read_bytes()
    want = (
        b"SDXT" + struct.pack("<II", 6, 2) + struct.pack("<qq", 2, 3) + np.ascontiguousarray(a).astype("<f4").tobytes()
    )
    assert raw == want
    big = np.arange(3, dtype=">i4")  # big-endian input is stored little-endian
    assert write_tensor(tmp_path / "b.bin", big).read_bytes()[20:] == np.arange(3, dtype="<i4").tobytes()


def test_malformed_tensor_files_are_clear(tmp_path):
    good = write_tensor(tmp_path / "g.bin", np.ones((2, 2), np.float32)).read_bytes()
    cases = {
        "magic": (b"XXXX" + good[4:], "not an SDXT tensor file"),
        "short": (good[:-1], "bytes, expected"),
        "long": (good + b"\0", "bytes, expected"),
        "dtype": (good[:4] + struct.pack("<I", 99) + good[8:], "unsupported dtype code 99"),
        "header": (good[:10], "not an SDXT tensor file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TensorFileError, match=message):
            read_tensor(tmp_path / name)
    with pytest.raises(TensorFileError, match="no such tensor file"):
        read_tensor(tmp_path / "absent.bin")
    with pytest.raises(TensorFileError, match="complex64 has no SDXT code"):
        write_tensor(tmp_path / "c.bin", np.zeros(2, np.complex64))


def test_runner_failure_is_one_line_with_executorch_cause():
    stderr = (
        "I 00:00:00.040 executorch:cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n"
        "E 00:00:00.069 executorch:method.cpp:822] Missing operator: [8] aten::native_layer_norm.out\n"
        "sdxs_runner: error: loading method 'forward' failed: Error::OperatorMissing (error 0x14)\n"
    )
    line = failure_line(stderr, 1)
    assert "\n" not in line
    assert line.startswith("loading method 'forward' failed") and "aten::native_layer_norm.out" in line
    assert failure_line("", -9) == "exit status -9 with no message (killed by a signal)"


# ---- arm64-emulated: missing pieces (fast) ----------------------------------------------------------
def test_missing_runner_names_the_make_target(tmp_path):
    bundle = _fake_bundle(tmp_path / "b")
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("qemu-aarch64-static is not installed: the session stops at qemu before the runner check")
    with pytest.raises(BackendMissingError) as e:
        runtimes.load(bundle, "arm64-emulated", runner=tmp_path / "no-runner")
    msg = str(e.value)
    assert "\n" not in msg and "no-runner is not built" in msg and "make arm64-runner" in msg


def test_missing_qemu_and_libraries_are_clear(tmp_path):
    bundle = _fake_bundle(tmp_path / "b")
    with pytest.raises(
        BackendMissingError,
        match=r"no-such-qemu not found \(apt-get install qemu-user-static, or run `make arm64-runner`",
    ):
        runtimes.load(bundle, "arm64-emulated", qemu="no-such-qemu")
    if shutil.which("qemu-aarch64-static") is None:
        return
    runner = _executable(tmp_path / "runner", "#!/bin/sh\n")
    with pytest.raises(BackendMissingError, match="aarch64 ExecuTorch libraries are missing from .*make arm64-runner"):
        runtimes.load(bundle, "arm64-emulated", runner=runner, lib_dir=tmp_path)


# ---- android: missing pieces (fast, with a stand-in adb) ---------------------------------------------
@pytest.fixture()
def fake_adb(tmp_path, monkeypatch) -> Path:
    (tmp_path / "bin").mkdir()
    adb = _executable(tmp_path / "bin" / "adb", FAKE_ADB)
    monkeypatch.setenv("PATH", f"{adb.parent}{os.pathsep}{os.environ['PATH']}")
    return adb


def test_android_without_adb(tmp_path):
    with pytest.raises(BackendMissingError, match=r"^adb not found \(apt-get install adb\)$"):
        runtimes.load(_fake_bundle(tmp_path / "b"), "android", adb=str(tmp_path / "no-adb"))


def test_android_without_device(tmp_path, fake_adb, monkeypatch):
    bundle = _fake_bundle(tmp_path / "b")
    monkeypatch.setenv("FAKE_ADB_DEVICES", "")
    with pytest.raises(BackendMissingError, match=r"^no Android device or emulator connected \(adb devices\)$"):
        runtimes.load(bundle, "android")
    monkeypatch.setenv("FAKE_ADB_DEVICES", "emulator-5554:offline")
    with pytest.raises(
        BackendMissingError,
        match=r"no Android device or emulator connected \(adb devices\); not ready: emulator-5554\s+offline",
    ):
        runtimes.load(bundle, "android")
    monkeypatch.setenv("FAKE_ADB_DEVICES", "a b")
    with pytest.raises(BackendMissingError, match="2 Android devices connected .*pass serial="):
        runtimes.load(bundle, "android")
    with pytest.raises(BackendMissingError, match="'c' is not connected"):
        runtimes.load(bundle, "android", serial="c")


def test_android_refuses_a_glibc_or_missing_runner(tmp_path, fake_adb, monkeypatch):
    bundle = _fake_bundle(tmp_path / "b")
    monkeypatch.setenv("FAKE_ADB_DEVICES", "emulator-5554")
    with pytest.raises(BackendMissingError, match="is not built; build it with the Android NDK"):
        runtimes.load(bundle, "android", runner=tmp_path / "absent")
    glibc = tmp_path / "glibc"
    glibc.write_bytes(_elf(b"/lib/ld-linux-aarch64.so.1"))
    with pytest.raises(BackendMissingError, match="glibc Linux binary .*bionic"):
        runtimes.load(bundle, "android", runner=glibc)
    x86 = tmp_path / "x86"
    x86.write_bytes(_elf(b"/system/bin/linker64", machine=62))
    with pytest.raises(BackendMissingError, match="not an arm64"):
        runtimes.load(bundle, "android", runner=x86)
    script = _executable(tmp_path / "script", "#!/bin/sh\n")
    with pytest.raises(BackendMissingError, match="not a 64-bit little-endian ELF"):
        runtimes.load(bundle, "android", runner=script)
    # A bionic arm64 executable passes the check; the placeholder programs are then pushed.
    bionic = tmp_path / "bionic"
    bionic.write_bytes(_elf(b"/system/bin/linker64"))
    device = tmp_path / "device"
    with runtimes.load(bundle, "android", runner=bionic, device_dir=str(device)) as s:
        assert sorted(p.name for p in device.iterdir()) == sorted(
            ["sdxs_runner"] + [f"{c}-{s.manifest['components'][c]['sha256'][:16]}.pte" for c in COMPONENTS]
        )
    if RUNNER.is_file():  # the real build is refused too, with the reason
        with pytest.raises(BackendMissingError, match="glibc Linux binary"):
            runtimes.load(bundle, "android", runner=RUNNER)


# ---- arm64-emulated: the runner itself (slow: emulation) --------------------------------------------
@pytest.mark.slow
def test_runner_checks_inputs_against_the_program(et_bundle, tmp_path):
    _need_runner()
    bundle = et_bundle("fp32")
    pte = str(bundle / json.loads((bundle / "manifest.json").read_text())["components"]["unet"]["file"])
    run = lambda *a: subprocess.run([*QEMU, str(RUNNER), *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    desc = run("--model", pte, "--describe")
    assert (
        desc.returncode == 0
        and "in0: dtype 6 shape [1,4,8,8]" in desc.stdout
        and "in1: dtype 6 shape [1,77,16]" in desc.stdout
    )
    write_tensor(tmp_path / "in0.bin", np.zeros((1, 4, 8, 8), np.float32))
    write_tensor(tmp_path / "in1.bin", np.zeros((1, 77, 8), np.float32))
    bad = run("--model", pte, "--io", str(tmp_path))
    assert (
        bad.returncode == 2
        and "in1.bin: dtype 6 shape [1,77,8] does not match input 1 of 'forward': dtype 6 shape [1,77,16]" in bad.stderr
    )
    write_tensor(tmp_path / "in1.bin", np.zeros((1, 77, 16), np.float32))
    assert run("--model", pte, "--io", str(tmp_path), "--method", "nope").returncode == 2
    ok = run("--model", pte, "--io", str(tmp_path), "--warmup", "1", "--iters", "2")
    assert ok.returncode == 0, ok.stderr
    timing = json.loads(ok.stdout.split("SDXS_TIMING ", 1)[1])
    assert timing["method"] == "forward" and len(timing["run_ms"]) == 2 and timing["outputs"] == 1
    assert read_tensor(tmp_path / "out0.bin").shape == (1, 4, 8, 8)


# Arm64 (NEON) against x86 (AVX) XNNPACK on the same program: fp32 differs only by summation order
# (~1e-7 relative, so > 90 dB); int8 arithmetic is integer, up to a rare one-step requantisation flip.
EMULATED_VS_X86_SNR_DB = {"fp32": 90.0, "int8": 40.0}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_arm64_emulated_parity(et_bundle, tmp_path, precision):
    """Per component: the torch reference within the precision's floor (runtimes.parity), and the x86
    ExecuTorch runtime on the same program within EMULATED_VS_X86_SNR_DB."""
    _need_runner()
    from runtimes.parity import check_floors, format_table, run_parity

    bundle = et_bundle(precision)
    # The runtime's own correctness first: the same program on x86, so a miss here is the runner's.
    with runtimes.load(bundle, "arm64-emulated") as arm, runtimes.load(bundle, "executorch") as x86:
        rng = np.random.default_rng(1)
        ids = arm.tokenize(["a large yellow cross at the center on a black background"])
        ctx = x86.encode_text(ids)
        lat = rng.standard_normal(arm.latent_shape, dtype=np.float32)
        for comp, inputs in {"text_encoder": (ids,), "unet": (lat, ctx), "decoder": (lat,)}.items():
            named = {s.name: a for s, a in zip(arm.specs[comp].inputs, inputs)}
            want, got = x86.run(comp, named), arm.run(comp, named)
            for name in want:
                snr = snr_db(want[name], got[name])
                print(
                    f"{precision} {comp}.{name}: arm64-emulated vs x86 executorch SNR {snr:.1f} dB, max abs {max_abs_error(want[name], got[name]):.2e}"
                )
                assert snr >= EMULATED_VS_X86_SNR_DB[precision], f"{comp}.{name}: {snr:.1f} dB"
        assert set(arm.native_timings) == set(COMPONENTS) and all(
            t["run_ms"][0] > 0 for t in arm.native_timings.values()
        )
    report = run_parity(
        bundle,
        "arm64-emulated",
        prompts=["a small red circle at the top on a white background"],
        json_out=tmp_path / "parity.json",
        check=False,
    )
    print(format_table(report))
    assert report["runtime"] == "arm64-emulated"
    check_floors(report)


@pytest.mark.slow
def test_arm64_emulated_runner_failure_is_one_clear_line(et_bundle, tmp_path):
    """A program the runner cannot load (a damaged .pte, sha256 check off) is a RunnerError, one line."""
    _need_runner()
    bundle = Path(shutil.copytree(et_bundle("fp32"), tmp_path / "b"))
    (bundle / "decoder.pte").write_bytes(b"\0" * 64)
    with runtimes.load(bundle, "arm64-emulated", verify=False) as s:
        with pytest.raises(RunnerError) as e:
            s.decode(np.zeros(s.latent_shape, np.float32))
    assert "\n" not in str(e.value) and str(e.value).startswith("decoder on arm64-emulated:")


# ---- android (slow) ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_android_protocol_with_stand_in_adb(et_bundle, tmp_path, fake_adb, monkeypatch):
    """AndroidSession's push / shell / pull sequence end to end, against a stand-in adb whose "device" is
    this machine running the arm64 runner under qemu; outputs must equal the arm64-emulated runtime's."""
    _need_runner()
    from runtimes.android import AndroidSession

    monkeypatch.setenv("FAKE_ADB_DEVICES", "emulator-5554")
    # The Linux runner is glibc and refused on a real device; here the "device" is glibc too.
    monkeypatch.setattr(AndroidSession, "check_runner", lambda self: None)
    wrapper = _executable(tmp_path / "runner.sh", f'#!/bin/sh\nexec {" ".join(QEMU)} {RUNNER} "$@"\n')
    bundle = et_bundle("fp32")
    device = tmp_path / "device"
    with (
        runtimes.load(bundle, "android", runner=wrapper, device_dir=str(device)) as phone,
        runtimes.load(bundle, "arm64-emulated") as emu,
    ):
        noise = emu.noise(0)
        a = phone.generate_arrays("a small red circle at the top on a white background", noise=noise)
        b = emu.generate_arrays("a small red circle at the top on a white background", noise=noise)
        np.testing.assert_array_equal(a.image, b.image)
        assert set(phone.native_timings) == set(COMPONENTS)
    assert not list(device.glob("io-*")), "close() leaves no io folders on the device"


def _android_ready() -> str | None:
    """Why the real-device test cannot run, or None."""
    from runtimes.android import DEFAULT_RUNNER

    if shutil.which("adb") is None:
        return "adb is not installed (apt-get install adb)"
    out = subprocess.run(["adb", "devices"], capture_output=True, text=True, timeout=60).stdout
    if not any(ln.strip().endswith("\tdevice") for ln in out.splitlines()[1:]):
        return "no Android device or emulator connected (adb devices)"
    if not DEFAULT_RUNNER.is_file():
        return f"the Android runner {DEFAULT_RUNNER.relative_to(ROOT)} is not built (runtimes/native/README.md, Android NDK)"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_android_device_parity(et_bundle, tmp_path, precision):
    why = _android_ready()
    if why:
        pytest.skip(why)
    from runtimes.parity import format_table, run_parity

    report = run_parity(
        et_bundle(precision),
        "android",
        prompts=["a small red circle at the top on a white background"],
        json_out=tmp_path / "parity.json",
    )
    print(format_table(report))
    assert report["passed"]
