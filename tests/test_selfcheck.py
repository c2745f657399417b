"""`sdxs-edge parity BUNDLE --reference none`: a bundle against the PyTorch images its conversion recorded
(`sdxs_edge.selfcheck`, `runtimes.selfcheck`), on the shipped model's ONNX fp32 bundle (trained, so the
image floor is enforced). The torch-free run is in tests/test_torch_free.py."""

from __future__ import annotations

import copy
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bundle_cache import cached_bundle

from sdxs_edge.atomic import write_atomic
from sdxs_edge.bundle import BundleError, sha256_path, validate_manifest
from sdxs_edge.cli import main
from sdxs_edge.floors import FLOORS


@pytest.fixture(scope="module")
def shipped() -> Path:
    return cached_bundle("default", "onnx", "fp32")


@pytest.fixture
def bundle_copy(shipped, tmp_path) -> Path:
    return Path(shutil.copytree(shipped, tmp_path / "b"))


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _selfcheck(capsys, bundle: Path, *extra: str) -> tuple[int, str, str]:
    rc = main(["parity", str(bundle), "--runtime", "onnxruntime", "--reference", "none", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def _replace_reference(bundle: Path, images: np.ndarray) -> None:
    """Write other (valid) reference images and the manifest's sha256 to match."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.concatenate(list(images), axis=1), "RGB").save(buf, format="PNG")
    write_atomic(bundle / "selfcheck.png", buf.getvalue())
    m = _manifest(bundle)
    m["selfcheck"]["sha256"] = sha256_path(bundle / "selfcheck.png")
    write_atomic(bundle / "manifest.json", json.dumps(m))


def test_conversion_records_the_selfcheck(shipped):
    from converters.calibration import PARITY_PROMPTS, PARITY_SEED0
    from sdxs_edge.selfcheck import read_images

    m = _manifest(shipped)
    rec = m["selfcheck"]
    assert rec["rng"] == "torch" and rec["floor_image_psnr_db"] == FLOORS["fp32"].image_psnr_db and rec["enforced"]
    assert [s["prompts"] for s in rec["samples"]] == [[p] for p in PARITY_PROMPTS]
    assert [s["seed"] for s in rec["samples"]] == [PARITY_SEED0, PARITY_SEED0 + 1]
    images = read_images(shipped, m)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 10  # real pictures


def test_selfcheck_passes_on_the_shipped_bundle(shipped, tmp_path, capsys):
    """Exit 0 and a parity-like report, CPU class included; the API gives the same report."""
    from runtimes.parity import format_table, run_parity

    rc, out, err = _selfcheck(capsys, shipped, "--json", str(tmp_path / "r.json"))
    assert rc == 0, err
    first = out.splitlines()[0]
    assert first.startswith("self-check  onnxruntime vs recorded PyTorch images") and "CPU class " in first, out
    assert "seeds 1000,1001 (torch rng)" in first and "PASSED" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["image"]["enforced"] and report["samples"] == 2
    psnr = report["image"]["psnr_db"]
    assert psnr == "inf" or psnr >= FLOORS["fp32"].image_psnr_db
    api = run_parity(shipped, "onnxruntime", reference="none")
    assert api["image"] == report["image"] and format_table(api).splitlines()[-1] == "PASSED"


def test_altered_reference_is_refused(bundle_copy, capsys):
    """A changed byte in the recorded images: refused by the bundle's sha256 check, with and without
    --no-verify (the self-check always hashes its reference)."""
    f = bundle_copy / "selfcheck.png"
    f.write_bytes(f.read_bytes() + b"\0")
    for extra in ((), ("--no-verify",)):
        rc, _, err = _selfcheck(capsys, bundle_copy, *extra)
        assert rc == 2 and err.count("\n") == 1, err
        assert "self-check file selfcheck.png was altered (sha256 mismatch)" in err, err


def test_other_reference_image_fails_the_floor(bundle_copy, tmp_path, capsys):
    """Valid reference images of other pictures (each recorded image inverted, sha256 rewritten): the
    bundle verifies, the image PSNR falls below the floor, the exit code is non-zero, the JSON is written."""
    from sdxs_edge.selfcheck import read_images

    images = read_images(bundle_copy, _manifest(bundle_copy))
    _replace_reference(bundle_copy, 255 - images)
    rc, out, err = _selfcheck(capsys, bundle_copy, "--json", str(tmp_path / "r.json"))
    assert rc == 2 and err.count("\n") == 1, err
    assert "is below its parity floors: image PSNR" in err and f"< {FLOORS['fp32'].image_psnr_db:g} dB" in err, err
    assert "FAILED: image PSNR" in out
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_wrong_size_reference_is_refused(bundle_copy, capsys):
    from sdxs_edge.selfcheck import read_images

    images = read_images(bundle_copy, _manifest(bundle_copy))
    _replace_reference(bundle_copy, images[:1])
    rc, _, err = _selfcheck(capsys, bundle_copy)
    assert rc == 2 and "expected PNG RGB 128x64 (2 images of 64px)" in err, err


def test_bundle_without_selfcheck_says_reconvert(bundle_copy, capsys):
    m = _manifest(bundle_copy)
    del m["selfcheck"]
    (bundle_copy / "selfcheck.png").unlink()
    write_atomic(bundle_copy / "manifest.json", json.dumps(m))
    rc, _, err = _selfcheck(capsys, bundle_copy)
    assert rc == 2 and err.count("\n") == 1 and "records no self-check reference" in err and "reconvert" in err, err


def test_selfcheck_refuses_other_prompts_seeds_and_rng(shipped, capsys):
    for extra, want in ((("--seeds", "3"), "drop --prompts and --seeds"), (("--rng", "numpy"), "--rng numpy")):
        rc, _, err = _selfcheck(capsys, shipped, *extra)
        assert rc == 2 and want in err, err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(file="../x.png"), "$.selfcheck.file"),
        (lambda r: r.update(sha256="abc"), "$.selfcheck.sha256"),
        (lambda r: r.update(samples=[]), "1 to 64 are allowed"),
        (lambda r: r["samples"][0].update(prompts=["a", "b"]), "expected 1 prompt(s)"),
        (lambda r: r["samples"][0].update(seed=-1), "$.selfcheck.samples[0].seed"),
        (lambda r: r.pop("rng"), "missing key 'rng'"),
    ],
)
def test_manifest_validation_of_the_selfcheck_record(shipped, change, message):
    m = copy.deepcopy(_manifest(shipped))
    change(m["selfcheck"])
    with pytest.raises(BundleError, match=None) as e:
        validate_manifest(m)
    assert message in str(e.value)
