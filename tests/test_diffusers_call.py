"""diffusers' call on the pipeline and on a bundle session, image-to-image on the PyTorch pipeline, and the
SHAPES-64 strength sweep."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxs_edge import sampler, shapes
from sdxs_edge.errors import SDXSError
from sdxs_edge.init_image import InitImageError, load_init_image
from sdxs_edge.pipeline import SDXSPipeline

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sdxs_edge" / "default_model"
PROMPT = "a small red circle at the top on a white background"


@pytest.fixture(scope="module")
def pipe() -> SDXSPipeline:
    return SDXSPipeline.load(MODEL)


def test_call_gives_diffusers_image(pipe):
    """The call with a seeded generator equals diffusers' StableDiffusionPipeline on the same folder."""
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = StableDiffusionPipeline.from_pretrained(
            MODEL, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
        )
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=1, guidance_scale=0.0, num_images_per_prompt=2, output_type="np")
    want = ref(
        [PROMPT, "a large blue square at the left on a black background"],
        generator=torch.Generator().manual_seed(3),
        **kw,
    ).images
    got = pipe(
        [PROMPT, "a large blue square at the left on a black background"],
        generator=torch.Generator().manual_seed(3),
        **kw,
    ).images
    assert got.shape == want.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)  # same modules, same noise; float summation order only


def test_call_sizes_generators_and_outputs(pipe):
    out = pipe(PROMPT, height=64, width=96, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 1 and out.images[0].size == (96, 64)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    both = pipe(PROMPT, num_images_per_prompt=2, generator=gens, output_type="pt").images
    one = pipe(PROMPT, generator=torch.Generator().manual_seed(6), output_type="pt").images
    assert both.shape == (2, 3, 64, 64) and 0 <= float(both.min()) and float(both.max()) <= 1
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=0)  # one generator per image, as diffusers
    assert pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent").images.shape == (1, 4, 8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=60), "height must be a positive multiple of 8"),
        (dict(width=0, height=64), "width must be a positive multiple of 8"),
        (dict(strength=0.5), "strength is for image-to-image"),
        (dict(output_type="latents"), "output_type must be one of"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be >= 1"),
        (dict(generator=[torch.Generator()] * 3), "3 generators for 1 images"),
        (dict(generator=0), "generator must be a torch.Generator"),
    ],
)
def test_call_refuses_bad_input(pipe, kwargs, match):
    with pytest.raises(SDXSError, match=match):
        pipe(PROMPT, **kwargs)


# ---- image-to-image ----------------------------------------------------------------------------------
def test_strength_timestep_and_rule():
    assert (
        sampler.strength_timestep(1.0) == 999
        and sampler.strength_timestep(0.5) == 499
        and sampler.strength_timestep(1e-4) == 0
    )
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(SDXSError, match=r"strength must be in \(0, 1\]"):
            sampler.strength_timestep(bad)
    cfg = {"prediction_type": "v_prediction"}
    c = sampler.one_step_constants(cfg, 1.0, 499)
    z0, noise = np.full((1, 4, 2, 2), 0.7, np.float32), np.ones((1, 4, 2, 2), np.float32)
    x_in = sampler.initial_latent(noise, c, z0)
    np.testing.assert_allclose(x_in, (0.7 + c.sigma) / np.sqrt(c.sigma**2 + 1), rtol=1e-6)
    # a perfect v-prediction (v = alpha * eps - sigma_vp * x0) recovers z0 exactly
    a, sv = 1 / np.sqrt(c.sigma**2 + 1), c.sigma / np.sqrt(c.sigma**2 + 1)
    np.testing.assert_allclose(sampler.denoised(a * noise - sv * z0, noise, c, z0), z0, atol=1e-5)


def test_image_to_image_keeps_the_image_at_low_strength(pipe):
    scene = shapes.eval_scenes(1, 3)[0]
    src = shapes.render(scene)
    other = "a large green cross at the bottom right on a black background"
    g = lambda: torch.Generator().manual_seed(0)
    low = pipe(other, image=src, strength=0.05, generator=g(), output_type="np").images[0]
    high = pipe(other, image=src, strength=1.0, generator=g(), output_type="np").images[0]
    d_low, d_high = np.abs(low - src / 255.0).mean(), np.abs(high - src / 255.0).mean()
    assert d_low < 0.06 < d_high, (d_low, d_high)  # 0.05 keeps the render (tiny encoder + decoder round trip)


def test_init_image_bad_inputs(tmp_path):
    from PIL import Image

    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(InitImageError, match="is not a readable image"):
        load_init_image(tmp_path / "x.png", 64, 64)
    with pytest.raises(InitImageError, match="does not exist"):
        load_init_image(tmp_path / "missing.png", 64, 64)
    Image.new("RGBA", (64, 64)).save(tmp_path / "a.png")
    with pytest.raises(InitImageError, match="has an alpha channel"):
        load_init_image(tmp_path / "a.png", 64, 64)
    Image.new("RGB", (32, 48), (255, 0, 0)).save(tmp_path / "small.png")
    with pytest.warns(UserWarning, match="is 32x48; resized to 64x64"):
        a = load_init_image(tmp_path / "small.png", 64, 64)
    assert a.shape == (1, 3, 64, 64) and np.allclose(a[0, 0], 1.0) and np.allclose(a[0, 1], -1.0)
    with pytest.raises(InitImageError, match="image array"):
        load_init_image(np.zeros((64, 64), np.uint8), 64, 64)


def test_generate_cli_image_to_image(tmp_path, capsys):
    from PIL import Image

    from sdxs_edge.cli import main

    src = tmp_path / "src.png"
    Image.fromarray(shapes.render(shapes.eval_scenes(1, 0)[0])).save(src)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdxs_edge.cli",
            "generate",
            "a large blue square at the left on a black background",
            "--image",
            str(src),
            "--strength",
            "0.6",
            "--out",
            str(tmp_path / "o.png"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "o.png").size == (64, 64) and "strength 0.6" in r.stdout
    for args, msg in [  # in-process: each ends in one error line and a non-zero exit, nothing written
        (("--strength", "0.5"), "--strength is for image-to-image"),
        (("--image", str(tmp_path / "nope.png")), "does not exist"),
        (("--image", str(src), "--encoder", str(tmp_path)), "has no config.json"),
    ]:
        assert main(["generate", PROMPT, *args, "--out", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()  # library loading bars may come before it
        assert err[-1].startswith("error: ") and msg in err[-1], err
        assert not (tmp_path / "bad.png").exists()
    with pytest.raises(SystemExit):
        main(["generate", PROMPT, "--image", str(src), "--strength", "0", "--out", str(tmp_path / "bad.png")])
    assert "--strength must be in (0, 1]" in capsys.readouterr().err


def test_strength_sweep_changes_attributes_more_as_strength_grows(pipe):
    """SHAPES-64: a render re-generated with a caption differing in every attribute moves more of its
    attributes to the new caption (evaluator) as the strength grows, and keeps fewer of its own."""
    from sdxs_edge.evaluate import strength_sweep

    rep, images = strength_sweep(pipe, (0.1, 0.5, 1.0), n=8)
    assert images.shape == (8, 4, 64, 64, 3)
    t, s = rep["target_rate"], rep["source_rate"]
    assert t[0] < t[1] < t[2] and t[2] >= 0.8, t  # docs/img2img-strength.json: 0.15, 0.55, 0.925
    assert s[0] > s[1] > s[2] and s[0] >= 0.5, s  # 0.65, 0.2, 0.0


def test_teacher_encoder_by_flag():
    """attach_encoder(teacher vae/) encodes with the teacher's KL encoder (posterior mean): same latent space,
    so low strength keeps the render; a folder that is not a VAE is refused before loading."""
    from sdxs_edge.errors import ModelLoadError

    p = SDXSPipeline.load(MODEL).attach_encoder(ROOT / "models" / "shapes-teacher" / "vae")
    assert type(p.encoder_vae).__name__ == "AutoencoderKL"
    src = shapes.render(shapes.eval_scenes(1, 3)[0])
    low = p(
        "a large green cross at the bottom right on a black background",
        image=src,
        strength=0.05,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert np.abs(low - src / 255.0).mean() < 0.06
    with pytest.raises(ModelLoadError, match="has no config.json"):
        p.attach_encoder(ROOT / "models")
    assert p.attach_encoder(None).encoder_vae is None
