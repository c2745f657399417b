"""One bundle, several sizes and batches (`sdxs_edge.sizes`, `convert --sizes/--max-batch`).

The fast tests check the parsing, the request's one-line refusals and the manifest record. The bundle
tests convert the shipped SHAPES-64 model at three sizes (64x64, 96x64, 64x96: the U-Net's three stages
need multiples of 32) with a batch up to 2, to ONNX int8, ExecuTorch int8 and Core ML fp16 (checked
structurally: Core ML prediction needs macOS), and run parity at each size on the runtimes that run them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.registry import UnsupportedConversion
from converters.request import ConversionRequest
from sdxs_edge import sizes
from sdxs_edge.bundle import BundleError, validate_manifest

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "sdxs_edge" / "default_model")
SIZES = "64x64,96x64,64x96"
OPTIONS = {"sizes": SIZES, "max_batch": 2}
PROMPT = "a large cyan triangle at the bottom left on a black background"


# ---- parsing and the request ----------------------------------------------------------------------------
def test_parse_and_range():
    assert sizes.parse_sizes("512x512, 512X768,") == ((512, 512), (512, 768))
    assert sizes.size_range("64x64", "192x128") == ((64, 64), (64, 128), (128, 64), (128, 128), (192, 64), (192, 128))
    assert sizes.method_name(((64, 64), (96, 64)), (64, 64)) == "forward"
    assert sizes.method_name(((64, 64), (96, 64)), (96, 64)) == "forward_96x64"


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "the size list is empty"),
        (" , ,", "the size list is empty"),
        ("64", "is not WIDTHxHEIGHT"),
        ("64x60", "multiples of 8"),
        ("64x64,64x64", "listed twice"),
    ],
)
def test_bad_size_lists(text, match):
    with pytest.raises(sizes.SizeError, match=match):
        sizes.check_sizes(sizes.parse_sizes(text))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"sizes": ""}, "the size list is empty"),
        ({"sizes": "64x70"}, "multiples of 8"),
        ({"sizes": [(64, 64), (64, 64)]}, "listed twice"),
        ({"sizes": "64x64", "resolution": 64}, "either resolution or sizes"),
        ({"max_batch": 0}, "max_batch must be an integer >= 1"),
        ({"max_batch": 2, "batch": 2}, "leave batch at 1"),
        ({"sizes": "64x64,96x64", "controlnet": object()}, "one size and a static batch"),
        ({"max_batch": 2, "target": "coreml"}, "coreml bundles take a static batch"),
        ({"max_batch": 2, "target": "executorch"}, "executorch bundles take a static batch"),
    ],
)
def test_request_refuses(options, match):
    options = {"target": "onnx", **options}
    with pytest.raises(UnsupportedConversion, match=match):
        ConversionRequest("tiny", options.pop("target"), "fp32", "/tmp/x", **options)


def test_request_defaults_keep_one_size():
    req = ConversionRequest("tiny", "onnx", "fp32", "/tmp/x")
    assert req.sizes is None and req.max_batch == 1 and not req.dynamic_shapes
    req = ConversionRequest("tiny", "onnx", "fp32", "/tmp/x", sizes="64x64,96x64")
    assert req.sizes == ((64, 64), (96, 64)) and req.dynamic_shapes


def test_convert_cli_refuses_in_one_line():
    for args, match in [
        (["--sizes", "64x63"], "multiples of 8"),
        (["--min-size", "64x64"], "--min-size and --max-size go together"),
        (["--min-size", "128x64", "--max-size", "64x64"], "below --min-size"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
    ]:
        r = subprocess.run(
            [sys.executable, "-m", "sdxs_edge.cli", "convert", "tiny", "--target", "onnx", "--precision", "fp32"]
            + ["--out", "/tmp/never-written", "--dry-run", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 2 and match in r.stderr.strip().splitlines()[-1], r.stderr  # argparse: usage, one error
        assert not Path("/tmp/never-written").exists()


def test_shapes_scale_with_the_size():
    assert sizes.shape_at((1, 4, 8, 8), (64, 64), (96, 64), 2) == (2, 4, 8, 12)
    assert sizes.shape_at((1, 3, 64, 64), (64, 64), (64, 96), 1) == (1, 3, 96, 64)
    assert sizes.shape_at((1, 77, 128), (64, 64), (96, 64), 2) == (2, 77, 128)
    assert sizes.size_of((1, 4, 8, 12), (1, 4, 8, 8), (64, 64)) == (96, 64)
    assert sizes.size_of((1, 4, 3, 4), (1, 4, 3, 3), (64, 64)) is None


def _manifest(**extra) -> dict:
    m = {
        "format": "sdxs-edge-bundle",
        "format_version": 1,
        "source": {"model": "m", "sha256": "0" * 64},
        "target": "onnx",
        "precision": "fp32",
        "resolution": 64,
        "batch": 1,
        "sampler": {
            "timestep": 999,
            "sigma": 1.0,
            "input_scale": 1.0,
            "prediction_type": "epsilon",
            "latent_scaling": 1.0,
        },
        "tokenizer": {"dir": "tokenizer", "max_length": 77},
        "components": {},
    }
    return {**m, **extra}


def test_manifest_sizes_are_checked():
    validate_manifest(_manifest(sizes=[[64, 64], [96, 64]], max_batch=4, size_multiple=32))
    with pytest.raises(BundleError, match="lists a size twice"):
        validate_manifest(_manifest(sizes=[[64, 64], [64, 64]]))
    with pytest.raises(BundleError, match=r"\$.sizes"):
        validate_manifest(_manifest(sizes=[[64, 64, 64]]))
    with pytest.raises(BundleError, match="max_batch"):
        validate_manifest(_manifest(max_batch=10_000))


def test_request_check_lists_what_the_bundle_takes():
    m = _manifest(sizes=[[64, 64], [96, 64]], max_batch=2, size_multiple=32)
    sizes.check_request(m, 96, 64, 2)
    with pytest.raises(sizes.SizeError, match="has no size 64x96; it takes 64x64, 96x64"):
        sizes.check_request(m, 64, 96, 1)
    with pytest.raises(sizes.SizeError, match="multiples of 32"):
        sizes.check_request(m, 72, 64, 1)
    with pytest.raises(sizes.SizeError, match="batch 3 .*batch 1 to 2"):
        sizes.check_request(m, 64, 64, 3)
    one = _manifest()
    with pytest.raises(sizes.SizeError, match="batch 2 .*batch 1 only"):
        sizes.check_request(one, 64, 64, 2)


# ---- bundles of the shipped model at three sizes -------------------------------------------------------
def _bundle(target: str, precision: str) -> Path:
    from tests.bundle_cache import cached_bundle

    options = OPTIONS if target == "onnx" else {"sizes": SIZES}  # Core ML and ExecuTorch: a static batch
    return cached_bundle(MODEL, target, precision, "sizes", **options)


def _parity_at_every_size(bundle: Path, runtime: str) -> dict:
    from runtimes.parity import run_parity

    batch = json.loads((bundle / "manifest.json").read_text()).get("max_batch", 1)
    report = run_parity(bundle, runtime, batch=batch)  # raises ParityError under a floor, at any size
    rows = {r["size"]: r for r in report["sizes"]}
    assert list(rows) == ["64x64", "96x64", "64x96"] and all(r["passed"] for r in rows.values())
    assert rows["64x64"]["all_correct"]["status"] == "measured"  # the SHAPES-64 evaluator reads 64x64 only
    return report


@pytest.mark.heavy
def test_onnx_int8_parity_at_three_sizes():
    bundle = _bundle("onnx", "int8")
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["sizes"] == [[64, 64], [96, 64], [64, 96]] and m["max_batch"] == 2 and m["size_multiple"] == 32
    assert m["components"]["unet"]["inputs"][0]["shape"] == [1, 4, 8, 8]  # declared at the first size, batch 1
    assert set(m["parity"]["components"]["unet"]["sizes"]) == {"64x64", "96x64", "64x96"}
    _parity_at_every_size(bundle, "onnxruntime")


@pytest.mark.heavy
def test_executorch_int8_parity_at_three_sizes():
    bundle = _bundle("executorch", "int8")
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["conversion"]["components"]["unet"]["methods"] == ["forward", "forward_64x96", "forward_96x64"]
    _parity_at_every_size(bundle, "executorch")


@pytest.mark.heavy
def test_executorch_native_runs_every_size():
    from runtimes.native_session import DEFAULT_RUNNER

    if not DEFAULT_RUNNER.is_file():
        pytest.skip("the host runner is missing (make host-runner)")
    _parity_at_every_size(_bundle("executorch", "int8"), "executorch-native")


@pytest.mark.heavy
def test_coreml_fp16_enumerates_the_sizes():
    bundle = _bundle("coreml", "fp16")
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["parity"]["checked"] == "structural"
    assert m["sizes"] == [[64, 64], [96, 64], [64, 96]] and "max_batch" not in m
    unet, decoder = (m["conversion"]["components"][c] for c in ("unet", "decoder"))
    assert unet["enumerated_shapes"] == {"latent": [[1, 4, 8, 8], [1, 4, 8, 12], [1, 4, 12, 8]]}
    assert decoder["enumerated_shapes"] == unet["enumerated_shapes"]
    assert "enumerated_shapes" not in m["conversion"]["components"]["text_encoder"]


@pytest.mark.heavy
def test_sizes_and_batches_on_a_session(tmp_path):
    import runtimes

    bundle = _bundle("onnx", "int8")
    with runtimes.load(bundle, "onnxruntime") as s:
        assert s.sizes == ((64, 64), (96, 64), (64, 96)) and s.max_batch == 2
        out = s(PROMPT, width=96, height=64, num_images_per_prompt=2, seed=3, output_type="np").images
        assert out.shape == (2, 64, 96, 3)
        one = s.generate(PROMPT, seed=3, width=96, height=64)
        assert one.size == (96, 64)
        assert np.array_equal(np.asarray(one), (out[0] * 255).round().astype(np.uint8))
        again = s.generate(PROMPT, seed=4, width=96, height=64, image=one, strength=0.5)  # the encoder at 96x64
        assert again.size == (96, 64)
        for kwargs, match in [
            (dict(width=128, height=64), "has no size 128x64; it takes 64x64, 96x64, 64x96"),
            (dict(width=72), "multiples of 32"),
            (dict(num_images_per_prompt=3), "over the bundle's batch bound \\(2"),
        ]:
            with pytest.raises(Exception, match=match) as e:
                s(PROMPT, **kwargs)
            assert "\n" not in str(e.value)
    r = subprocess.run(
        [sys.executable, "-m", "sdxs_edge.cli", "run", str(bundle), PROMPT, "--runtime", "onnxruntime"]
        + ["--width", "64", "--height", "96", "--batch", "2", "--out", str(tmp_path / "img.png")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert [Image.open(tmp_path / f"img-{i}.png").size for i in range(2)] == [(64, 96)] * 2
    r = subprocess.run(
        [sys.executable, "-m", "sdxs_edge.cli", "run", str(bundle), PROMPT, "--runtime", "onnxruntime"]
        + ["--width", "128", "--height", "64", "--out", str(tmp_path / "no.png")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "it takes 64x64, 96x64, 64x96" in r.stderr and not (tmp_path / "no.png").exists()
