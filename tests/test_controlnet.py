"""ControlNet deployment on the "tiny" preset: the component wrappers, bundles with a ControlNet on ONNX
(fp32, int8), ExecuTorch (fp32) and Core ML (structural), the runtimes against the PyTorch pipeline with
the same control image, parity, the CLIs, and every bad input as one clear error.

The test ControlNet (`_test_controlnet`) is `controlnet_for_unet` with random zero convolutions: an
untrained ControlNet is an exact no-op (all its output convolutions start at zero), so residuals would be
zero and no test could tell a control image from none.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_cache import BUNDLE_CACHE, need, prune, source_key

import runtimes
from runtimes.base import RuntimeInputError, Session
from sdxs_edge.bundle import BundleError, load_manifest, sha256_path
from sdxs_edge.control import ControlImageError, canny, prompt_controls
from sdxs_edge.controlnet import ControlNetMismatchError, controlnet_for_unet, save_controlnet
from sdxs_edge.metrics import snr_db

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a small red circle at the top on a white background"
RESIDUALS = [
    "down_res_0",
    "down_res_1",
    "down_res_2",
    "down_res_3",
    "mid_res",
]  # tiny: conv_in, 2 stages of 1 resnet, 1 downsampler
FP32_ATOL = 1e-4  # images in [-1, 1]: fp32 lowerings differ from PyTorch by summation order only (~1e-6 seen)
INT8_FLOOR_DB = 25.0  # the registry's int8 component floor


def _test_controlnet(pipe):
    """A deterministic ControlNet for the tiny U-Net whose control image visibly moves the U-Net output.

    The zero convolutions (controlnet_down_blocks, controlnet_mid_block, and the control embedding's last
    conv) get random weights; the control embedding's other convs are scaled by 2, since diffusers' default
    init shrinks a sparse edge map ~100x on its way through them. Measured here: the control image changes
    the U-Net output by ~0.025 (fp32 noise is ~1e-6), and ONNX int8 keeps the ControlNet at 31.6 dB and the
    U-Net at 28.8 dB against their 25 dB floor.
    """
    torch.manual_seed(0)  # the control embedding is initialised from the global generator
    cn = controlnet_for_unet(pipe.c.unet, (16, 32, 64, 128))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for m in [cn.controlnet_cond_embedding.conv_in, *cn.controlnet_cond_embedding.blocks]:
            m.weight.mul_(2.0)
    return cn.eval()


# ---- cached bundles --------------------------------------------------------------------------------
# As in test_runtimes.py: converted bundles (and the ControlNet folder their manifests name) are kept under
# build/test-bundles/, keyed by the sha256 of the converters/ and sdxs_edge/ sources, `_test_controlnet`
# and the backend versions, so only the first run after a change pays for the ExecuTorch lowering (~55 s on two
# cores). Each conversion enforces its own parity floors when it is built.
@pytest.fixture(scope="module")
def pipe():
    from sdxs_edge.pipeline import SDXSPipeline

    torch.set_num_threads(2)
    return SDXSPipeline.load("tiny")


@pytest.fixture(scope="module")
def store(pipe) -> Path:
    """This run's cache folder, holding the test ControlNet (saved once)."""
    root = BUNDLE_CACHE / f"tiny-controlnet-{source_key('tiny-controlnet', inspect.getsource(_test_controlnet))}"
    if not (root / "controlnet" / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        save_controlnet(_test_controlnet(pipe), root / "controlnet", overwrite=True)
    prune(root, "tiny-controlnet-*")
    return root


@pytest.fixture(scope="module")
def cn_dir(store) -> Path:
    return store / "controlnet"


@pytest.fixture(scope="module")
def make_bundle(store, cn_dir):
    """(target, precision) -> a tiny bundle with the test ControlNet (cached, see bundle_cache)."""
    from converters.api import convert

    def get(target: str, precision: str) -> Path:
        out = store / f"{target}-{precision}"
        if not (out / "manifest.json").is_file():
            tmp = out.with_name(f".{out.name}.{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            convert(
                "tiny", target, precision, tmp, controlnet=cn_dir, progress=False
            )  # int8: the default 32 calibration prompts
            try:
                os.rename(tmp, out)
            except OSError:  # another run finished the same bundle first
                shutil.rmtree(tmp)
        return out

    return get


@pytest.fixture(scope="module")
def cn_pipe(cn_dir):
    """The PyTorch pipeline with the test ControlNet attached (the reference every runtime must match)."""
    from sdxs_edge.pipeline import SDXSPipeline

    return SDXSPipeline.load("tiny").attach_controlnet(cn_dir)


@pytest.fixture(scope="module")
def edges_png(tmp_path_factory) -> Path:
    """A 64x64 control image file: canny edges of a SHAPES-64 render of PROMPT's scene."""
    from PIL import Image

    f = tmp_path_factory.mktemp("control") / "edges.png"
    Image.fromarray((prompt_controls([PROMPT], 64, 3)[0, 0] * 255).astype(np.uint8)).save(f)
    return f


# ---- components ----------------------------------------------------------------------------------
def test_wrappers_declare_residuals_and_match_the_pipeline(pipe, cn_pipe):
    """io_specs names one residual per U-Net skip + mid_res with the shapes the ControlNet returns, and
    text encoder -> ControlNet -> U-Net(residuals) -> decoder is exactly the pipeline's controlled generation."""
    from sdxs_edge import components as C
    from sdxs_edge import sampler

    cn = cn_pipe.controlnet
    specs = C.io_specs(pipe, controlnet=cn)
    assert list(specs) == ["text_encoder", "controlnet", "unet", "decoder"]
    ins, outs = specs["controlnet"]
    assert [s.name for s in ins] == ["latent", "context", "control"] and ins[2].shape == (1, 3, 64, 64)
    assert [s.name for s in outs] == RESIDUALS
    assert [s.name for s in specs["unet"][0]] == ["latent", "context", *RESIDUALS]
    assert "controlnet" not in C.io_specs(pipe) and len(C.io_specs(pipe)["unet"][0]) == 2
    mods = C.wrappers(pipe, cn)
    with torch.no_grad():
        res = mods["controlnet"](*C.example_inputs(pipe, "controlnet", controlnet=cn))
    assert [tuple(r.shape) for r in res] == [s.shape for s in outs]
    noise = pipe.noise(1, 4)
    control = torch.from_numpy(prompt_controls([PROMPT], 64, 4))
    c = pipe.one_step_constants()
    with torch.no_grad():
        ctx = mods["text_encoder"](pipe.tokenize([PROMPT]).int())
        x_in = sampler.initial_latent(noise, c)
        eps = mods["unet"](x_in, ctx, *mods["controlnet"](x_in, ctx, control))
        image = mods["decoder"](sampler.denoised(eps, noise, c))
    want = cn_pipe.generate(PROMPT, noise=noise, control_image=control, output="tensor").images
    torch.testing.assert_close(image, want, rtol=0, atol=1e-6)


# ---- bundles: convert, run, match the pipeline -------------------------------------------------------
def _eps_from(latents: np.ndarray, noise: np.ndarray, sigma: float) -> np.ndarray:
    """The U-Net output implied by the one-step x0 (epsilon prediction: x0 = sigma * (noise - eps))."""
    return noise - latents / np.float32(sigma)


@pytest.mark.parametrize(
    "target, precision, runtime",
    [
        ("onnx", "fp32", "onnxruntime"),
        ("onnx", "int8", "onnxruntime"),
        pytest.param("executorch", "fp32", "executorch", marks=pytest.mark.heavy),
    ],
)
def test_bundle_with_controlnet_matches_the_pipeline(
    make_bundle, cn_pipe, cn_dir, edges_png, target, precision, runtime
):
    need({"onnx": "onnxruntime", "executorch": "executorch"}[target])
    bundle = make_bundle(target, precision)
    m = load_manifest(bundle)
    assert list(m["components"]) == ["text_encoder", "controlnet", "unet", "decoder"]
    assert [t["name"] for t in m["components"]["controlnet"]["outputs"]] == RESIDUALS
    assert [t["name"] for t in m["components"]["unet"]["inputs"]] == ["latent", "context", *RESIDUALS]
    rec = m["source"]["controlnet"]
    assert rec["model"] == str(cn_dir) and rec["sha256"] == sha256_path(cn_dir) and rec["control_scale"] == 1.0
    assert (
        m["conversion"]["config"]["controlnet"] == str(cn_dir)
        and m["conversion"]["config"]["controlnet_sha256"] == rec["sha256"]
    )
    par = m["parity"]["components"]["controlnet"]
    assert par["snr_db"] is None or par["snr_db"] >= (60.0 if precision == "fp32" else INT8_FLOOR_DB), par
    assert m["parity"]["end_to_end"]["images"] == 2 and "edge_iou" in m["parity"]["end_to_end"]
    if precision == "int8":
        assert m["conversion"]["components"]["controlnet"]["quantized_compute_nodes"] > 0

    # The runtime against SDXSPipeline.generate(control_image=...): same prompt, noise and control file.
    with runtimes.load(bundle, runtime) as s:
        got = s.generate_arrays(PROMPT, seed=7, control_image=edges_png)
    assert list(got.timings) == ["tokenize", "text_encoder", "controlnet", "unet", "decoder"]
    want = cn_pipe.generate(PROMPT, noise=torch.from_numpy(got.noise), control_image=edges_png, output="tensor")
    np.testing.assert_array_equal(got.control, prompt_controls([PROMPT], 64, 3))  # the file, read as saved
    if precision == "fp32":
        np.testing.assert_allclose(got.image, want.images.numpy(), atol=FP32_ATOL)
    else:  # int8: the U-Net output (recovered from the pipeline's x0) within the int8 floor, not bit-equal
        eps = _eps_from(want.latents.numpy(), got.noise, m["sampler"]["sigma"])
        snr = snr_db(eps, got.model_output)
        assert INT8_FLOOR_DB <= snr < 60.0, snr  # quantized, and still within the floor


def test_control_image_changes_the_output(make_bundle, cn_pipe):
    """Edges vs a blank control: the U-Net output and the image move, on the runtime and in PyTorch alike
    (a broken residual path, e.g. residuals not reaching the U-Net, would leave them equal)."""
    need("onnxruntime")
    edges = prompt_controls([PROMPT], 64, 1)
    blank = np.zeros_like(edges)
    with runtimes.load(make_bundle("onnx", "fp32"), "onnxruntime") as s:
        a, b = (s.generate_arrays(PROMPT, seed=2, control_image=c) for c in (edges, blank))
    assert np.abs(a.model_output - b.model_output).max() > 1e-2  # fp32 noise is ~1e-6
    assert not np.array_equal(a.image, b.image)
    assert all(np.abs(x - y).max() > 1e-2 for x, y in zip(a.residuals, b.residuals))
    pa, pb = (
        cn_pipe.generate(
            PROMPT, noise=torch.from_numpy(a.noise), control_image=torch.from_numpy(c), output="tensor"
        ).images.numpy()
        for c in (edges, blank)
    )
    np.testing.assert_allclose(pa, a.image, atol=FP32_ATOL)
    np.testing.assert_allclose(pb, b.image, atol=FP32_ATOL)


def test_parity_reports_edge_iou_for_both_sides(make_bundle, tmp_path):
    from runtimes.parity import format_table, run_parity

    need("onnxruntime")
    rep = run_parity(make_bundle("onnx", "int8"), "onnxruntime", seeds=(0,), json_out=tmp_path / "p.json")
    assert rep["passed"] and list(rep["components"]) == ["text_encoder", "controlnet", "unet", "decoder"]
    assert all(float(r["snr_db"]) >= INT8_FLOOR_DB for r in rep["components"].values())
    ctl = rep["control"]
    assert 0.0 <= ctl["edge_iou_reference"] <= 1.0 and 0.0 <= ctl["edge_iou_runtime"] <= 1.0
    assert "edge IoU" in format_table(rep) and json.loads((tmp_path / "p.json").read_text())["control"] == ctl


def test_torch_reference_needs_the_recorded_controlnet(make_bundle, tmp_path):
    """The torch runtime loads the ControlNet the manifest names, refuses a changed one, and says what to
    pass when the manifest names none (a ControlNet converted from a module)."""
    bundle = Path(shutil.copytree(make_bundle("onnx", "fp32"), tmp_path / "b"))
    with runtimes.load(bundle, "torch") as s:
        assert s.controlnet is not None and s.generate(PROMPT, control_image=prompt_controls([PROMPT], 64)).size == (
            64,
            64,
        )
    m = json.loads((bundle / "manifest.json").read_text())
    m["source"]["controlnet"]["weights_sha256"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="has changed since .* was converted"):
        runtimes.load(bundle, "torch")
    m["source"]["controlnet"]["model"] = None
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="converted from a module.*pass controlnet="):
        runtimes.load(bundle, "torch")


@pytest.mark.skipif(importlib.util.find_spec("coremltools") is None, reason="coremltools is not installed")
def test_coreml_conversion_with_controlnet_is_structurally_valid(cn_pipe, tmp_path):
    """Core ML cannot predict on Linux: the packages' names, shapes and dtypes are checked instead. The
    text encoder and decoder are the plain ones the converter tests cover, so they are left out here."""
    import coremltools as ct

    from converters.api import convert

    out = convert(
        cn_pipe,
        "coreml",
        "fp16",
        tmp_path / "b",
        components=("controlnet", "unet"),
        controlnet=cn_pipe.controlnet,
        control_scale=0.5,
        progress=False,
    )
    m = load_manifest(out)
    assert (
        m["parity"]["checked"] == "structural"
        and m["source"]["controlnet"]["model"] is None
        and m["source"]["controlnet"]["control_scale"] == 0.5
    )
    for c in ("controlnet", "unet"):
        entry = m["components"][c]
        spec = ct.utils.load_spec(str(out / entry["file"]))
        assert spec.WhichOneof("Type") == "mlProgram"
        assert [i.name for i in spec.description.input] == [t["name"] for t in entry["inputs"]]
        assert [o.name for o in spec.description.output] == [t["name"] for t in entry["outputs"]]
        assert [list(o.type.multiArrayType.shape) for o in spec.description.output] == [
            t["shape"] for t in entry["outputs"]
        ]
        assert m["parity"]["components"][c]["checked"] == "structural"
    assert [i.name for i in ct.utils.load_spec(str(out / "unet.mlpackage")).description.input] == [
        "latent",
        "context",
        *RESIDUALS,
    ]


# ---- bad input -------------------------------------------------------------------------------------
def test_controlnet_for_another_unet_is_refused_before_lowering(tmp_path, monkeypatch):
    from converters import to_onnx
    from converters.api import convert
    from sdxs_edge.pipeline import SDXSPipeline

    other = save_controlnet(
        controlnet_for_unet(SDXSPipeline.load("tiny-teacher").c.unet, (16, 32, 64, 128)), tmp_path / "other"
    )
    monkeypatch.setattr(to_onnx, "convert_component", lambda job: pytest.fail(f"{job.name} was lowered"))
    with pytest.raises(
        ControlNetMismatchError,
        match=r"built for another U-Net: block_out_channels \[8, 16, 16, 16\] vs the U-Net's \[8, 16\]",
    ) as e:
        convert("tiny", "onnx", "fp32", tmp_path / "b", controlnet=other, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"control_scale": 0.5}, "control_scale=0.5 needs a ControlNet"),
        ({"components": ("controlnet", "unet")}, "the controlnet component needs a ControlNet"),
        ({"controlnet": "x", "components": ("controlnet", "decoder")}, "add unet to the components"),
        ({"controlnet": "x", "control_scale": float("nan")}, "control_scale must be a finite number"),
    ],
)
def test_bad_controlnet_requests(tmp_path, kw, match):
    from converters.api import convert
    from converters.registry import UnsupportedConversion

    with pytest.raises(UnsupportedConversion, match=match):
        convert("no-such-model", "onnx", "fp32", tmp_path / "b", progress=False, **kw)


def test_missing_controlnet_folder_fails_before_loading(tmp_path):
    from converters.api import convert
    from sdxs_edge.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="is not a folder"):
        convert("no-such-model", "onnx", "fp32", tmp_path / "b", controlnet=tmp_path / "missing", progress=False)


def test_manifest_needs_unet_residual_inputs(make_bundle, tmp_path):
    bundle = Path(shutil.copytree(make_bundle("onnx", "fp32"), tmp_path / "b"))
    m = json.loads((bundle / "manifest.json").read_text())
    m["components"]["unet"]["inputs"] = m["components"]["unet"]["inputs"][:-1]
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="the unet does not declare the ControlNet residual input 'mid_res'"):
        load_manifest(bundle)


def _echo(bundle: Path) -> Session:
    class Echo(Session):
        name = "echo"

        def _run(self, component, inputs):
            return {s.name: np.full(s.shape, 0.1, s.dtype) for s in self.specs[component].outputs}

    return Echo(bundle)


def test_control_image_errors_on_the_runtime(make_bundle, tmp_path):
    """Missing / unexpected / wrong-size / non-square / unreadable / out-of-range control images."""
    from PIL import Image

    bundle = make_bundle("onnx", "fp32")
    s = _echo(bundle)
    with pytest.raises(RuntimeInputError, match="has a ControlNet: give a control image"):
        s.generate(PROMPT)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(small)
    with pytest.warns(UserWarning, match="is 32x32; resized to 64x64"):
        assert s.generate_arrays(PROMPT, control_image=small).control.shape == (1, 3, 64, 64)
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(wide)
    with pytest.raises(ControlImageError, match="is 96x64; .* must be square"):
        s.generate(PROMPT, control_image=wide)
    (tmp_path / "junk.png").write_bytes(b"no image")
    with pytest.raises(ControlImageError, match="not a readable image"):
        s.generate(PROMPT, control_image=tmp_path / "junk.png")
    with pytest.raises(RuntimeInputError, match=r"values must be finite and in \[0, 1\]"):
        s.generate(PROMPT, control_image=np.full((1, 3, 64, 64), 2.0, np.float32))
    with pytest.raises(
        RuntimeInputError, match=r"expected float \(1, 3, 64, 64\) in \[0, 1\], got float32\[1, 3, 32, 32\]"
    ):
        s.generate(PROMPT, control_image=np.zeros((1, 3, 32, 32), np.float32))
    # The same bundle without its ControlNet (manifest edited): no control image is taken.
    plain = Path(shutil.copytree(bundle, tmp_path / "plain"))
    m = json.loads((plain / "manifest.json").read_text())
    del m["components"]["controlnet"]
    (plain / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        BundleError, match="its U-Net takes ControlNet residuals .* but the bundle has no controlnet component"
    ):
        _echo(plain)
    m["components"]["unet"]["inputs"] = m["components"]["unet"]["inputs"][:2]
    (plain / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RuntimeInputError, match="has no ControlNet, so it takes no control image"):
        _echo(plain).generate(PROMPT, control_image=small)


# ---- CLI -------------------------------------------------------------------------------------------
def _main(capsys, *args: str) -> tuple[int, str, str]:
    from sdxs_edge.cli import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error(err: str, message: str) -> None:
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err


def test_cli_canny(tmp_path, capsys):
    from PIL import Image

    from sdxs_edge import shapes

    img = shapes.render(shapes.sample_scene(np.random.default_rng(0), shape="cross", size="large"))
    Image.fromarray(img).save(tmp_path / "scene.png")
    rc, out, _ = _main(capsys, "canny", tmp_path / "scene.png", tmp_path / "edges.png")
    assert rc == 0 and "edge pixels" in out
    edges = np.asarray(Image.open(tmp_path / "edges.png"))
    np.testing.assert_array_equal(edges, canny(img))
    assert edges.any() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "junk.png").write_bytes(b"no image")
    _one_error(_main(capsys, "canny", tmp_path / "junk.png", tmp_path / "e.png")[2], "is not a readable image")
    _one_error(_main(capsys, "canny", tmp_path / "scene.png", tmp_path / "e.jpg")[2], "OUT must end in .png")


def test_cli_generate_with_controlnet(cn_dir, edges_png, tmp_path, capsys):
    from PIL import Image

    small = tmp_path / "small.png"
    Image.open(edges_png).resize((32, 32)).save(small)
    rc, out, err = _main(
        capsys,
        "generate",
        PROMPT,
        "--model",
        "tiny",
        "--controlnet",
        cn_dir,
        "--control",
        small,
        "--control-scale",
        "0.7",
        "--out",
        tmp_path / "a.png",
    )
    assert rc == 0 and (tmp_path / "a.png").is_file() and "controlnet" in out and "scale 0.7" in out
    assert "warning: " in err and "resized to 64x64" in err
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(wide)
    from sdxs_edge.pipeline import SDXSPipeline

    other = save_controlnet(
        controlnet_for_unet(SDXSPipeline.load("tiny-teacher").c.unet, (16, 32, 64, 128)), tmp_path / "other"
    )
    for args, message in [
        (["--controlnet", cn_dir, "--control", wide], "must be square"),
        (["--controlnet", cn_dir, "--control", tmp_path / "missing.png"], "does not exist"),
        (["--control", edges_png], "--control needs a ControlNet"),
        (["--controlnet", cn_dir], "--controlnet needs a control image"),
        (["--controlnet", other, "--control", edges_png], "the ControlNet was built for another U-Net"),
    ]:
        rc, _, err = _main(capsys, "generate", PROMPT, "--model", "tiny", *args, "--out", tmp_path / "b.png")
        assert rc == 2
        _one_error(err, message)


def test_cli_convert_run_and_parity(make_bundle, cn_dir, edges_png, tmp_path, capsys):
    need("onnxruntime")
    bundle = make_bundle("onnx", "fp32")
    rc, out, err = _main(
        capsys, "run", bundle, PROMPT, "--runtime", "onnxruntime", "--control", edges_png, "--out", tmp_path / "a.png"
    )
    assert rc == 0 and "controlnet" in out and (tmp_path / "a.png").is_file(), err
    rc, out, err = _main(capsys, "parity", bundle, "--runtime", "onnxruntime")
    assert rc == 0 and "controlnet" in out and "edge IoU" in out and "PASSED" in out, err
    rc, out, _ = _main(
        capsys,
        "convert",
        "tiny",
        "--target",
        "onnx",
        "--precision",
        "fp32",
        "--out",
        tmp_path / "c",
        "--controlnet",
        cn_dir,
        "--dry-run",
    )
    req = json.loads(out)
    assert (
        rc == 0
        and req["components"] == ["text_encoder", "controlnet", "unet", "decoder"]
        and req["controlnet"]["sha256"] == sha256_path(cn_dir)
    )
    plain = Path(
        shutil.copytree(bundle, tmp_path / "plain")
    )  # the same bundle without its ControlNet, for the torch runtime
    m = json.loads((plain / "manifest.json").read_text())
    del m["components"]["controlnet"]
    m["components"]["unet"]["inputs"] = m["components"]["unet"]["inputs"][:2]
    (plain / "manifest.json").write_text(json.dumps(m))
    wide = tmp_path / "wide.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 80), np.uint8)).save(wide)
    for args, message in [
        (
            ["run", bundle, PROMPT, "--runtime", "onnxruntime", "--out", tmp_path / "b.png"],
            "has a ControlNet: give a control image",
        ),
        (
            ["run", bundle, PROMPT, "--runtime", "onnxruntime", "--control", wide, "--out", tmp_path / "b.png"],
            "must be square",
        ),
        (
            ["run", plain, PROMPT, "--runtime", "torch", "--control", edges_png, "--out", tmp_path / "b.png"],
            "has no ControlNet, so it takes no control image",
        ),
        (
            [
                "convert",
                "tiny",
                "--target",
                "onnx",
                "--precision",
                "fp32",
                "--out",
                tmp_path / "d",
                "--control-scale",
                "2",
            ],
            "--control-scale needs --controlnet PATH",
        ),
    ]:
        rc, _, err = _main(capsys, *args)
        assert rc == 2
        _one_error(err, message)


@pytest.mark.slow
def test_arm64_emulated_runs_a_controlnet_bundle(make_bundle):
    """The native runner takes any number of inputs and outputs, so the ControlNet bundle runs unchanged
    under qemu: the same program's outputs as the x86 ExecuTorch runtime, to summation order."""
    if not (ROOT / "build" / "arm64" / "sdxs_runner").is_file() or shutil.which("qemu-aarch64-static") is None:
        pytest.skip("needs `make arm64-runner` (build/arm64/sdxs_runner) and qemu-aarch64-static")
    bundle = make_bundle("executorch", "fp32")
    control = prompt_controls([PROMPT], 64, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with runtimes.load(bundle, "arm64-emulated") as arm, runtimes.load(bundle, "executorch") as x86:
            a, x = (s.generate_arrays(PROMPT, seed=1, control_image=control) for s in (arm, x86))
            assert set(arm.native_timings) == {"text_encoder", "controlnet", "unet", "decoder"}
    for p, q in [*zip(x.residuals, a.residuals), (x.model_output, a.model_output), (x.image, a.image)]:
        assert snr_db(p, q) >= 90.0  # fp32 on NEON vs AVX: summation order only
