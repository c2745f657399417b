"""The shipped SHAPES-64 one-step model on every CPU runtime: convert it, run it, prove parity.

Marked `shipped` (run with `make test-shipped`, which CI runs after `make test`): it converts the embedded
default model to ONNX fp32/fp16/int8 and ExecuTorch fp32/int8 and checks each bundle against the PyTorch
reference on the runtime that runs it, per component (SNR, max abs error), end to end (image PSNR) and on
the SHAPES-64 evaluator: the all-correct rate of the bundle must stay within 3 points of the fp32
reference model's (`runtimes.parity.Floors.all_correct_points`). The arm64-emulated runtime (the C++
runner under qemu-aarch64-static, `make arm64-runner`) runs the ExecuTorch fp32 and int8 bundles, and
the executorch-native runtime (the same runner built for this machine, `make host-runner`) the int8 one.
The int8 conversions are checked on every CPU class this machine can run or emulate (`sdxs_edge.cpu`):
its own, an AVX2-only x86-64 CPU (qemu-x86_64-static -cpu Haswell where the host has VNNI), and arm64 for
the ExecuTorch bundle (ONNX bundles: no aarch64 onnxruntime runs here).
libsdxs (runtimes/native/sdxs.h) runs the int8 bundle through the executorch-capi runtime, and `sdxs-run`
writes the Python executorch runtime's image for it on x86-64 and, cross-built, under aarch64 emulation.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from runtimes.parity import run_parity
from sdxs_edge import shapes

pytestmark = pytest.mark.shipped

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sdxs_edge" / "default_model"
RUNNER = ROOT / "build" / "arm64" / "sdxs_runner"
HOST_RUNNER = ROOT / "build" / "host" / "sdxs_runner"
SDXS_RUN = {
    "x86-64": [str(ROOT / "build" / "host" / "sdxs-run")],
    "aarch64": [
        "qemu-aarch64-static",
        "-cpu",
        "cortex-a76",
        "-L",
        "/usr/aarch64-linux-gnu",
        str(ROOT / "build" / "arm64" / "sdxs-run"),
    ],
}
RESULTS = ROOT / "out" / "shipped-parity"
N_PROMPTS = 512  # x86 runtimes: the evaluation set the distillation report uses
N_PROMPTS_EMULATED = 64  # qemu runs the ARM kernels about 150x slower than native


def _prompts(n: int) -> list[str]:
    return [s.caption for s in shapes.eval_scenes(n, 0)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(target, precision) -> a bundle of the shipped model, converted once per run."""
    from converters import convert

    built: dict[tuple[str, str], Path] = {}

    def get(target: str, precision: str) -> Path:
        if importlib.util.find_spec({"onnx": "onnxruntime", "executorch": "executorch"}[target]) is None:
            pytest.skip(f"the {target} runtime package is not installed")
        if (target, precision) not in built:
            out = tmp_path_factory.mktemp("shipped") / f"{target}-{precision}"
            convert(
                str(MODEL),
                target,
                precision,
                out,
                progress=False,
                cpu_classes=_classes(target) if precision == "int8" else ("host",),
            )
            built[(target, precision)] = out
        return built[(target, precision)]

    return get


def _classes(target: str) -> tuple[str, ...]:
    from sdxs_edge import cpu

    classes = ["host", "x86-64-avx2"] if cpu.host_class().startswith("x86-64") else ["host"]
    if target == "executorch" and RUNNER.is_file() and shutil.which("qemu-aarch64-static"):
        classes.append("arm64")
    return cpu.parse_classes(",".join(classes))


@pytest.mark.parametrize("target", ["onnx", "executorch"])
def test_int8_checked_on_every_class(bundle, target):
    from sdxs_edge import cpu

    manifest = json.loads((bundle(target, "int8") / "manifest.json").read_text())
    records = manifest["parity"]["cpu_classes"]
    assert [r["class"] for r in records] == list(_classes(target))
    for r in records:
        worst = min(c["snr_db"] for c in r["components"].values())
        print(f"{target} int8 as {r['class']} ({r['how']}): lowest component SNR {worst:.1f} dB")
    assert cpu.host_class() in cpu.checked_classes(manifest)


def _check(bundle_dir: Path, runtime: str, n: int) -> dict:
    RESULTS.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    out = RESULTS / f"{runtime}-{manifest['target']}-{manifest['precision']}.json"
    report = run_parity(bundle_dir, runtime, prompts=_prompts(n), json_out=out)  # raises ParityError under a floor
    ac = report["all_correct"]
    assert ac["status"] == "measured" and ac["n"] == n, ac
    psnr = report["image"]["psnr_db"]  # a string ("inf") when the images are identical
    print(
        f"{runtime} {manifest['target']} {manifest['precision']}: image PSNR {psnr if isinstance(psnr, str) else f'{psnr:.1f}'} dB, "
        f"all-correct {ac['runtime']:.3f} vs fp32 reference {ac['reference']:.3f} ({-ac['points']:+.1f} points)"
    )
    return report


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_onnxruntime(bundle, precision):
    _check(bundle("onnx", precision), "onnxruntime", N_PROMPTS)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_executorch(bundle, precision):
    _check(bundle("executorch", precision), "executorch", N_PROMPTS)


def test_torch(bundle):
    report = _check(bundle("onnx", "fp32"), "torch", N_PROMPTS)
    assert report["all_correct"]["points"] == 0.0


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_arm64_emulated(bundle, precision):
    if shutil.which("qemu-aarch64-static") is None or not RUNNER.is_file():
        pytest.skip("the arm64 runner or qemu-aarch64-static is missing (make arm64-runner)")
    _check(bundle("executorch", precision), "arm64-emulated", N_PROMPTS_EMULATED)


def test_executorch_native(bundle):
    if not HOST_RUNNER.is_file():
        pytest.skip("the host runner is missing (make host-runner)")
    _check(bundle("executorch", "int8"), "executorch-native", N_PROMPTS)


def test_executorch_capi(bundle):
    if not (ROOT / "build" / "host" / "libsdxs.so").is_file():
        pytest.skip("libsdxs is missing (make host-runner)")
    _check(bundle("executorch", "int8"), "executorch-capi", N_PROMPTS)


@pytest.mark.parametrize("arch", ["x86-64", "aarch64"])
def test_sdxs_run_writes_the_python_runtimes_image(bundle, tmp_path, arch):
    """sdxs-run (C++ only) against the Python executorch runtime fed torch.randn's noise for the same seed:
    the same uint8 image on x86-64; under aarch64 emulation (XNNPACK's NEON kernels) within the int8
    floor (image PSNR)."""
    import numpy as np
    import torch
    from PIL import Image

    import runtimes
    from runtimes.base import to_uint8
    from runtimes.parity import FLOORS
    from sdxs_edge.metrics import psnr

    cmd = SDXS_RUN[arch]
    if not Path(cmd[-1]).is_file() or (arch == "aarch64" and shutil.which(cmd[0]) is None):
        pytest.skip(f"{cmd[-1]} or qemu is missing (make host-runner / make arm64-runner)")
    b = bundle("executorch", "int8")
    prompts = _prompts(2 if arch == "aarch64" else 4)
    with runtimes.load(b, "executorch") as py:
        for seed, prompt in enumerate(prompts):
            noise = torch.randn(py.latent_shape, generator=torch.Generator().manual_seed(seed)).numpy()
            want = to_uint8(py.generate_arrays(prompt, noise=noise).image)[0]
            out = tmp_path / f"{seed}.png"
            proc = subprocess.run(
                [*cmd, str(b), prompt, "--seed", str(seed), "--out", str(out)],
                capture_output=True,
                text=True,
                timeout=1800,
            )
            assert proc.returncode == 0, proc.stderr
            got = np.asarray(Image.open(out))
            value = psnr(want, got)
            print(
                f"sdxs-run {arch} int8 seed {seed}: {'identical' if np.array_equal(want, got) else f'PSNR {value:.1f} dB'}"
            )
            if arch == "x86-64":
                assert np.array_equal(want, got)
            else:
                assert value >= FLOORS["int8"].image_psnr_db
