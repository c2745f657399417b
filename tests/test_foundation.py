"""Foundation: presets, sampler math, pipeline determinism, save/load roundtrips, CLI bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxs_edge import sampler
from sdxs_edge.errors import ModelLoadError, NonFiniteError, SDXSError
from sdxs_edge.pipeline import SDXSPipeline
from sdxs_edge.presets import PRESETS, get_preset

PROMPT = "a small red circle at the top on a white background"


@pytest.fixture(scope="module")
def tiny() -> SDXSPipeline:
    return SDXSPipeline.load("tiny")


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory) -> Path:
    return tiny.save_pretrained(tmp_path_factory.mktemp("m") / "tiny")


def test_preset_table_and_unknown_name():
    assert {"sd21-base", "sdxs-512", "tiny", "shapes", "shapes-teacher"} <= set(PRESETS)
    with pytest.raises(ModelLoadError, match="valid presets: .*sdxs-512"):
        get_preset("sdxs-1024-nope")


def test_sdxs512_layout_matches_released_config():
    """ANCHORS.md: released SDXS-512 U-Net ~316M params, TAESD decoder 1,222,531 params."""
    from sdxs_edge.models import build_unet, build_vae, count_parameters

    p = get_preset("sdxs-512")
    assert p.unet["block_out_channels"] == [320, 640, 1280] and p.unet["mid_block_type"] is None
    with torch.device("meta"):
        unet, vae = build_unet(p), build_vae(p)
    assert 310e6 < count_parameters(unet) < 322e6
    assert count_parameters(vae.decoder) == 1_222_531


def test_one_step_recovers_x0_with_oracle_unet():
    """A U-Net that returns the true noise makes one step land on x0 (to float precision)."""
    c = sampler.one_step_constants(dict(get_preset("tiny").scheduler), latent_scaling=1.0)
    assert c.timestep == 999 and abs(c.sigma - 14.6146) < 1e-3
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    acp = sampler.alphas_cumprod(get_preset("tiny").scheduler)[c.timestep]
    x_t = np.sqrt(acp) * x0 + np.sqrt(1 - acp) * eps  # forward process at t=999
    # In diffusers' trailing-Euler convention the U-Net input is noise * input_scale; choose noise so it equals x_t.
    noise = x_t / c.input_scale
    out = sampler.sample_one_step(lambda x_in, t, ctx: eps, noise, None, c)
    np.testing.assert_allclose(out, x0, atol=2e-4 * np.abs(x0).max() * c.sigma)


def test_one_step_v_prediction_oracle():
    cfg = {**get_preset("tiny").scheduler, "prediction_type": "v_prediction"}
    c = sampler.one_step_constants(cfg, 1.0)
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal((2, 4, 4, 4)), rng.standard_normal((2, 4, 4, 4))
    a = sampler.alphas_cumprod(cfg)[999].astype(np.float64)
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    v = np.sqrt(a) * eps - np.sqrt(1 - a) * x0
    out = sampler.sample_one_step(lambda x, t, ctx: v, x_t / c.input_scale, None, c)
    np.testing.assert_allclose(out, x0, atol=1e-3)


def test_generate_is_deterministic_with_shapes(tiny):
    a = tiny.generate([PROMPT, "a large blue square at the left on a black background"], seed=3, output="tensor")
    b = tiny.generate([PROMPT, "a large blue square at the left on a black background"], seed=3, output="tensor")
    c = tiny.generate([PROMPT, "a large blue square at the left on a black background"], seed=4, output="tensor")
    assert a.images.shape == (2, 3, 64, 64) and a.images.dtype == torch.float32
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    pil = tiny.generate(PROMPT, seed=3).images[0]
    assert pil.size == (64, 64) and pil.mode == "RGB"
    assert set(a.timings) == {"text_encoder", "unet", "decoder"}


def test_multi_step_with_guidance_runs(tiny):
    g = tiny.generate(PROMPT, seed=0, steps=3, guidance=4.0, output="tensor")
    assert g.images.shape == (1, 3, 64, 64) and torch.isfinite(g.images).all()


def test_save_load_roundtrip_same_image(tiny, tiny_folder):
    again = SDXSPipeline.load(tiny_folder)
    a = tiny.generate(PROMPT, seed=5, output="tensor").images
    b = again.generate(PROMPT, seed=5, output="tensor").images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert json.loads((tiny_folder / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderTiny"]


def test_diffusers_loads_saved_folder_and_matches(tiny, tiny_folder):
    from diffusers import StableDiffusionPipeline

    d = StableDiffusionPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    d.set_progress_bar_config(disable=True)
    ref = d(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(7), output_type="np"
    ).images[0]
    ours = tiny.generate(PROMPT, seed=7, output="tensor").images[0]
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_teacher_layout_multistep_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = SDXSPipeline.load("tiny-teacher")
    folder = pipe.save_pretrained(tmp_path / "t")
    d = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    d.set_progress_bar_config(disable=True)
    ref = d(
        PROMPT, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(2), output_type="np"
    ).images[0]
    ours = pipe.generate(PROMPT, seed=2, steps=3, guidance=3.0, output="tensor").images[0]
    np.testing.assert_allclose((ours / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_long_prompt_is_truncated_with_warning(tiny):
    with pytest.warns(UserWarning, match="truncated"):
        ids = tiny.tokenize([" ".join(["red"] * 120)])
    assert ids.shape == (1, 77)


def test_missing_component_and_corrupt_weights(tiny_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="vae"):
        SDXSPipeline.load(broken)
    truncated = tmp_path / "trunc"
    shutil.copytree(tiny_folder, truncated)
    f = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors.*truncated"):
        SDXSPipeline.load(truncated)
    garbage = tmp_path / "garbage"
    shutil.copytree(tiny_folder, garbage)
    (garbage / "text_encoder" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        SDXSPipeline.load(garbage)


def test_pickled_weights_are_refused(tiny_folder, tmp_path):
    import shutil

    p = tmp_path / "bin"
    shutil.copytree(tiny_folder, p)
    f = p / "unet" / "diffusion_pytorch_model.safetensors"
    f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="pickled weights are refused"):
        SDXSPipeline.load(p)


def test_non_finite_output_names_component(tiny):
    pipe = SDXSPipeline.load("tiny")
    with torch.no_grad():
        next(pipe.c.unet.conv_out.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="unet"):
        pipe.generate(PROMPT)


def test_bad_sizes_and_steps(tiny):
    with pytest.raises(SDXSError, match="steps"):
        tiny.generate(PROMPT, steps=0)
    with pytest.raises(SDXSError, match="multiple of 8"):
        tiny.noise(1, 0, resolution=-8)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdxs_edge.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (("generate", "x", "--model", "no-such-preset"), "valid presets"),
        (("generate", "x", "--model", "tiny", "--steps", "0"), "--steps must be > 0"),
        (("generate", "x", "--model", "tiny", "--resolution", "-64"), "--resolution must be > 0"),
        (("generate", "x", "--model", "tiny", "--out", "image.txt"), "--out must end in"),
        (("info", "/no/such/folder"), "no preset or model folder"),
    ],
)
def test_cli_bad_input_is_one_line(args, message):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_cli_generate_writes_image_and_timings(tmp_path):
    out = tmp_path / "img.png"
    r = _cli("generate", PROMPT, "--model", "tiny", "--seed", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "unet" in r.stdout and "decoder" in r.stdout
