"""`convert --layout optimum`: the folder optimum's ONNX Runtime diffusion pipeline loads, with the manifest.

optimum-onnx cannot be installed beside this project's pins (every release on PyPI, 0.0.1 to 0.1.0, needs
transformers < 4.58; this project pins transformers 5; `optimum[onnxruntime]` resolves to optimum 1.17.1,
whose import fails on transformers 5: `cannot import name 'is_tf_available' from 'transformers.utils'`).
So these tests check the layout against the names optimum's source uses and run it as optimum's pipeline
does: diffusers' EulerDiscreteScheduler from scheduler/, transformers' CLIPTokenizer from tokenizer/, and
each ONNX program fed by optimum's tensor names (optimum/onnxruntime/modeling_diffusion.py: ORTTextEncoder,
ORTUnet, ORTVaeDecoder; optimum/exporters/onnx/model_configs.py: CLIPTextOnnxConfig, UNetOnnxConfig,
VaeDecoderOnnxConfig), then diffusers' StableDiffusionPipeline steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bundle_cache import cached_bundle, need

from converters.registry import UnsupportedConversion
from converters.request import ConversionRequest

PROMPT = "a small red circle at the top on a white background"
# optimum's names: subfolders (optimum.utils.constant), ONNX_WEIGHTS_NAME, and the exporters' tensors.
OPTIMUM_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json")
OPTIMUM_IO = {
    "text_encoder": ({"input_ids"}, "last_hidden_state"),
    "unet": ({"sample", "timestep", "encoder_hidden_states"}, "out_sample"),
    "vae_decoder": ({"latent_sample"}, "sample"),
}


@pytest.fixture(scope="module")
def optimum_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(the cached tiny ONNX fp32 bundle, a copy rearranged into the optimum layout by the write stage's code)."""
    need("onnxruntime")
    from converters.layouts import apply_layout
    from converters.stages import check_written
    from sdxs_edge.bundle import validate_manifest
    from sdxs_edge.pipeline import SDXSPipeline

    src = cached_bundle("tiny", "onnx", "fp32")
    dst = tmp_path_factory.mktemp("optimum") / "bundle"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    extra = apply_layout("optimum", SDXSPipeline.load("tiny", seed=0), manifest, dst)
    validate_manifest(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    check_written(dst, manifest, extra)
    return src, dst


def test_layout_has_optimums_files_and_names(optimum_bundle):
    import onnxruntime as ort

    _, b = optimum_bundle
    for f in OPTIMUM_FILES:
        assert (b / f).is_file(), f
    index = json.loads((b / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"][0] == "diffusers"
    for part, (inputs, output) in OPTIMUM_IO.items():
        assert (b / part / "config.json").is_file()
        s = ort.InferenceSession(str(b / part / "model.onnx"), providers=["CPUExecutionProvider"])
        assert {i.name for i in s.get_inputs()} == inputs
        assert s.get_outputs()[0].name == output
    sched = json.loads((b / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["_class_name"], sched["timestep_spacing"]) == ("EulerDiscreteScheduler", "trailing")


def _optimum_call(b: Path, prompt: str, seed: int) -> np.ndarray:
    """StableDiffusionPipeline(num_inference_steps=1, guidance_scale=0) as optimum runs it on this folder."""
    import onnxruntime as ort
    import torch
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    parts = {p: ort.InferenceSession(str(b / p / "model.onnx"), providers=["CPUExecutionProvider"]) for p in OPTIMUM_IO}
    cfg = {p: json.loads((b / p / "config.json").read_text()) for p in ("unet", "vae_decoder")}
    tok = CLIPTokenizer.from_pretrained(b / "tokenizer")
    sched = EulerDiscreteScheduler.from_pretrained(b / "scheduler")
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    ids = np.asarray(ids, np.int32)  # optimum casts each input to the session's declared type
    ctx = parts["text_encoder"].run(None, {"input_ids": ids})[0]
    side = cfg["unet"]["sample_size"]
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, cfg["unet"]["in_channels"], side, side), generator=g) * sched.init_noise_sigma
    sched.set_timesteps(1)
    for t in sched.timesteps:
        x_in = sched.scale_model_input(latents, t).numpy()
        feeds = {"sample": x_in, "encoder_hidden_states": ctx, "timestep": np.asarray([t], np.float32)}
        out = parts["unet"].run(["out_sample"], feeds)[0]
        latents = sched.step(torch.from_numpy(out), t, latents).prev_sample
    z = (latents / cfg["vae_decoder"]["scaling_factor"]).numpy()
    image = parts["vae_decoder"].run(["sample"], {"latent_sample": z})[0]
    x = np.clip(image * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 1)  # diffusers' VaeImageProcessor.postprocess
    return (x * 255).round().astype(np.uint8)[0]


def test_optimum_call_draws_the_bundles_image(optimum_bundle):
    """optimum's way through the folder draws our onnxruntime session's image for the same seed, and the
    rearranged bundle still runs as a bundle (same image as before the layout)."""
    import runtimes
    from runtimes.base import to_uint8

    src, b = optimum_bundle
    with runtimes.load(src, "onnxruntime") as s, runtimes.load(b, "onnxruntime") as t:
        want = s.generate_arrays(PROMPT, seed=3).image
        assert np.array_equal(t.generate_arrays(PROMPT, seed=3).image, want)
    got = _optimum_call(b, PROMPT, 3)
    assert np.abs(got.astype(int) - to_uint8(want)[0]).max() <= 1


def test_unet_refuses_another_timestep(optimum_bundle):
    """The one-step U-Net returns NaN for a timestep other than the bundle's (a loud failure, not a wrong image)."""
    import onnxruntime as ort

    _, b = optimum_bundle
    s = ort.InferenceSession(str(b / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32) for i in s.get_inputs()}
    feeds["timestep"] = np.asarray([500.0], np.float32)
    assert np.isnan(s.run(None, feeds)[0]).all()
    feeds["timestep"] = np.asarray([999.0], np.float32)
    assert np.isfinite(s.run(None, feeds)[0]).all()


@pytest.mark.parametrize(
    "target,kw,msg",
    [
        ("executorch", {}, "layout optimum is for target onnx bundles, not executorch"),
        ("onnx", {"components": ["unet"]}, "exactly text_encoder, unet and decoder"),
        ("onnx", {"layout": "keras"}, "unknown layout 'keras'"),
    ],
)
def test_layout_refused_before_converting(tmp_path, target, kw, msg):
    kw = {"layout": "optimum", **kw}
    with pytest.raises(UnsupportedConversion, match=msg):
        ConversionRequest("tiny", target, "fp32", tmp_path / "b", **kw)
    assert not (tmp_path / "b").exists()
