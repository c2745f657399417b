"""`sdxs_edge.torch_rng.randn` against PyTorch's CPU `torch.randn`, and the bundle runtimes' default noise."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxs_edge import torch_rng
from sdxs_edge.errors import SDXSError

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [
    (1,),
    (2,),
    (3,),
    (7,),
    (15,),
    (5, 3),
    (16,),
    (17,),
    (31,),
    (33,),
    (3, 5, 7),
    (2, 4, 8, 8),
    (1, 4, 64, 64),
    (1, 4, 96, 64),
]
SEEDS = [0, 1, 42, 12345, 2**31 + 5, 2**40 + 3, -1]
# PyTorch x86 builds dispatched to AVX2 run `normal_fill_16_AVX2`, which torch_rng evaluates exactly; other
# dispatches (AVX-512, ARM) run the scalar `normal_fill` with libm logf/cosf/sinf: a last-bit or two
# difference there (|x| < 6, float32 ulp <= 4.8e-7).
AVX2 = torch.backends.cpu.get_cpu_capability() == "AVX2"
TOLERANCE = 0.0 if AVX2 else 2e-6


def _torch(shape, seed) -> np.ndarray:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_randn_matches_torch(shape):
    for seed in SEEDS:
        want, got = _torch(shape, seed), torch_rng.randn(shape, seed)
        assert got.dtype == np.float32 and got.shape == want.shape
        if len(want.reshape(-1)) < 16:  # double-precision scalar path: same libm on both sides
            assert np.array_equal(got, want), (shape, seed)
        else:
            assert np.abs(got - want).max() <= TOLERANCE, (shape, seed, np.abs(got - want).max())


def test_randn_many_seeds_bitwise_on_avx2():
    """1.6 M draws of the default latent shape: every value equal (within TOLERANCE off AVX2)."""
    for seed in range(0, 100 * 7919, 7919):
        diff = np.abs(torch_rng.randn((1, 4, 64, 64), seed) - _torch((1, 4, 64, 64), seed)).max()
        assert diff <= TOLERANCE, (seed, diff)


def test_fma_rounds_once():
    """The halfway case double rounding gets wrong: 1 + 2^-23 + (2^-24 - 2^-60) rounds down to 1 + 2^-23."""
    a, b, c = np.float32(1 + 2**-18), np.float32(2**-24 * (1 - 2**-18)), np.float32(1 + 2**-23)
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    assert float(np.float64(a) * np.float64(b) + np.float64(c)) == 1 + 2**-23 + 2**-24  # the float64 sum is a tie
    assert torch_rng._fma(a, b, c) == np.float32(1 + 2**-23)
    assert abs(Fraction(float(torch_rng._fma(a, b, c))) - exact) < Fraction(2**-24)
    rng = np.random.default_rng(0)
    x, y, z = (rng.standard_normal(10_000).astype(np.float32) for _ in range(3))
    got = torch_rng._fma(x, y, z)
    for i in range(0, 10_000, 97):  # against exact rational arithmetic, rounded to nearest float32
        e = Fraction(float(x[i])) * Fraction(float(y[i])) + Fraction(float(z[i]))
        cands = [
            np.float32(float(e)),
            np.nextafter(np.float32(float(e)), np.float32(np.inf)),
            np.nextafter(np.float32(float(e)), np.float32(-np.inf)),
        ]
        best = min(cands, key=lambda v: abs(Fraction(float(v)) - e))
        assert got[i] == best


def test_randn_imports_no_torch_and_is_fast():
    code = (
        "import sys, time\nfrom sdxs_edge import torch_rng\n"
        "t = time.perf_counter(); torch_rng.randn((1, 4, 64, 64), 0); dt = time.perf_counter() - t\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nprint(dt)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout) < 0.5  # about 20 ms on two shared cores; the bound leaves room for load


@pytest.mark.parametrize("bad", [2**64, -(2**63) - 1, 1.5, "3"])
def test_randn_refuses_bad_seed(bad):
    with pytest.raises(SDXSError, match="seed must be an integer"):
        torch_rng.randn((16,), bad)


def test_randn_refuses_negative_dimension():
    with pytest.raises(SDXSError, match="negative dimension"):
        torch_rng.randn((2, -1), 0)


# ---- the same seed gives diffusers' image --------------------------------------------------------------
MODEL = ROOT / "sdxs_edge" / "default_model"
PROMPT = "a small red circle at the top on a white background"


@pytest.fixture(scope="module")
def default_onnx_fp32() -> Path:
    """The embedded default model as an ONNX fp32 bundle (cached in build/test-bundles; about a minute to build)."""
    from bundle_cache import cached_bundle

    return cached_bundle("default", "onnx", "fp32")


def test_bundle_seed_gives_diffusers_image(default_onnx_fp32):
    """diffusers' StableDiffusionPipeline (1 step, guidance 0, generator seeded) and the ONNX fp32 bundle with
    the same seed give the same picture, to the fp32 parity floors; numpy's stream gives another picture."""
    import warnings

    from diffusers import StableDiffusionPipeline

    import runtimes
    from runtimes.base import to_uint8
    from runtimes.parity import FLOORS
    from sdxs_edge import metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(
            MODEL, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
        )
    pipe.set_progress_bar_config(disable=True)
    floor = FLOORS["fp32"]
    with runtimes.load(default_onnx_fp32, "onnxruntime") as s:
        for seed in (0, 7):
            want = pipe(
                PROMPT,
                num_inference_steps=1,
                guidance_scale=0.0,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
            ).images
            want = want.transpose(0, 3, 1, 2) * 2 - 1  # diffusers clamps to [0, 1]: compare clamped images
            got = np.clip(s.generate_arrays(PROMPT, seed=seed).image, -1, 1)
            assert metrics.snr_db(want, got) >= floor.component_snr_db
            assert metrics.psnr(to_uint8(want), to_uint8(got)) >= floor.image_psnr_db
            other = s.generate_arrays(PROMPT, seed=seed, rng="numpy").image
            assert metrics.psnr(to_uint8(want), to_uint8(other)) < floor.image_psnr_db


def test_session_call_is_the_pipeline_call(default_onnx_fp32):
    """`Session.__call__(prompt, seed=s)` gives what `SDXSPipeline.__call__(prompt, generator=manual_seed(s))`
    gives (the fp32 floors), with diffusers' argument names; what a bundle cannot do is refused."""
    import runtimes
    from runtimes.base import RuntimeInputError
    from runtimes.parity import FLOORS
    from sdxs_edge import metrics
    from sdxs_edge.pipeline import SDXSPipeline

    pipe = SDXSPipeline.load(MODEL)
    want = pipe(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(4), output_type="np"
    ).images
    with runtimes.load(default_onnx_fp32, "onnxruntime") as s:
        got = s(PROMPT, num_inference_steps=1, guidance_scale=0.0, seed=4, output_type="np").images
        assert got.shape == want.shape == (1, 64, 64, 3)
        assert metrics.snr_db(want, got) >= FLOORS["fp32"].component_snr_db
        pil = s(PROMPT, seed=4).images
        assert len(pil) == 1 and np.array_equal(
            np.asarray(pil[0]), (np.clip(got[0], 0, 1) * 255).round().astype(np.uint8)
        )
        for kwargs, match in [
            (dict(height=128), "has no size 64x128; it takes 64x64"),
            (dict(width=0), "has no size 0x64; it takes 64x64"),
            (dict(num_inference_steps=4), "num_inference_steps must be 1"),
            (dict(guidance_scale=7.5), "guidance_scale must be <= 1"),
            (dict(num_images_per_prompt=2), "lowered for batch 1; got 2 prompt"),
            (dict(strength=0.5), "strength is for image-to-image: give an image too"),
            (dict(output_type="pt"), "output_type must be pil, np or latent"),
            (dict(rng="mt"), "unknown rng 'mt'"),
        ]:
            with pytest.raises(RuntimeInputError, match=match):
                s(PROMPT, **kwargs)


def test_run_cli_rng_flag(default_onnx_fp32, tmp_path):
    """`run --rng` picks the stream (torch by default) and says which; parity records it."""
    from PIL import Image

    from runtimes.parity import run_parity

    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "sdxs_edge.cli", "run", str(default_onnx_fp32), PROMPT, "--runtime", "onnxruntime", *a],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    images = {}
    for rng in ("torch", "numpy"):
        r = run("--rng", rng, "--seed", "2", "--out", str(tmp_path / f"{rng}.png"))
        assert r.returncode == 0 and f"seed 2 ({rng} rng)" in r.stdout, r.stderr[-1000:]
        images[rng] = np.asarray(Image.open(tmp_path / f"{rng}.png"))
    r = run("--seed", "2", "--out", str(tmp_path / "default.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "default.png")), images["torch"])
    assert not np.array_equal(images["torch"], images["numpy"])
    r = run("--rng", "mt", "--out", str(tmp_path / "bad.png"))
    assert r.returncode != 0 and "invalid choice: 'mt'" in r.stderr and not (tmp_path / "bad.png").exists()
    rep = run_parity(default_onnx_fp32, "onnxruntime", prompts=[PROMPT], rng="numpy", check=False)
    assert rep["rng"] == "numpy"
