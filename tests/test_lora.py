"""LoRA fusing (sdxs_edge.lora) on the "tiny" preset: the delta math per Linear / Conv2d layer, the file
layouts read, one-line errors for bad files, and the generate and convert paths that fuse before running
or lowering."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.registry import UnsupportedConversion
from sdxs_edge.errors import LoRAError, SDXSError
from sdxs_edge.lora import fuse_lora, load_lora, save_lora
from sdxs_edge.pipeline import SDXSPipeline

BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"
TARGETS = tuple(f"{BLOCK}.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
PROMPTS = [
    "a large cyan triangle at the bottom left on a black background",
    "a small red circle at the top on a white background",
]


@pytest.fixture(scope="module")
def pipe() -> SDXSPipeline:
    torch.set_num_threads(1)
    return SDXSPipeline.load("tiny")


def _lora(
    unet,
    targets=TARGETS,
    rank: int = 2,
    seed: int = 0,
    std: float = 0.5,
    prefix: str = "unet.",
    old_naming: bool = False,
    alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """A random LoRA for `targets` (conv targets get conv-shaped A (r, in, k, k) and B (out, r, 1, 1))."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    a_key, b_key = (".lora.down.weight", ".lora.up.weight") if old_naming else (".lora_A.weight", ".lora_B.weight")
    state = {}
    for name in targets:
        w = modules[name].weight
        a_shape = (rank, *w.shape[1:])
        b_shape = (w.shape[0], rank) + ((1, 1) if w.dim() == 4 else ())
        state[prefix + name + a_key] = torch.randn(a_shape, generator=g) * std
        state[prefix + name + b_key] = torch.randn(b_shape, generator=g) * std
        if alpha is not None:
            state[prefix + name + ".alpha"] = torch.tensor(float(alpha))
    return state


@pytest.fixture(scope="module")
def lora_file(pipe, tmp_path_factory) -> Path:
    return save_lora(tmp_path_factory.mktemp("lora") / "attn.safetensors", _lora(pipe.c.unet))


# ---- the math --------------------------------------------------------------------------------------------
def test_fused_linear_equals_explicit_delta(pipe, lora_file):
    raw = _lora(pipe.c.unet)
    lora = load_lora(lora_file)
    assert set(lora) == {k.removeprefix("unet.") for k in raw}
    unet = copy.deepcopy(pipe.c.unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    scale = 0.7
    fused = fuse_lora(unet, lora, scale=scale)
    assert fused == list(TARGETS)  # U-Net module order
    mods = dict(unet.named_modules())
    x = torch.randn(3, 5, mods[TARGETS[0]].in_features, generator=torch.Generator().manual_seed(1))
    for name in TARGETS:
        a, b = raw[f"unet.{name}.lora_A.weight"], raw[f"unet.{name}.lora_B.weight"]
        w0, bias = before[f"{name}.weight"], before[f"{name}.bias"] if f"{name}.bias" in before else None
        expected = x @ (w0 + scale * b @ a).T + (0 if bias is None else bias)
        with torch.no_grad():
            got = mods[name](x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, x @ w0.T + (0 if bias is None else bias), atol=1e-3)  # it did change
    after = unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.weight" for n in TARGETS}  # biases and every other layer untouched


def test_alpha_key_and_alpha_argument(pipe, tmp_path):
    rank, alpha = 2, 6.0
    raw = _lora(pipe.c.unet, targets=TARGETS[:1], rank=rank, alpha=alpha)
    name = TARGETS[0]
    a, b = raw[f"unet.{name}.lora_A.weight"], raw[f"unet.{name}.lora_B.weight"]
    w0 = dict(pipe.c.unet.named_modules())[name].weight.detach().clone()
    lora = load_lora(save_lora(tmp_path / "alpha.safetensors", raw))
    assert float(lora[f"{name}.alpha"]) == alpha
    for kw, factor in (({}, alpha / rank), ({"alpha": 1.0}, 1.0 / rank), ({"scale": 0.5}, 0.5 * alpha / rank)):
        unet = copy.deepcopy(pipe.c.unet)
        fuse_lora(unet, lora, **kw)
        torch.testing.assert_close(
            dict(unet.named_modules())[name].weight.detach(), w0 + factor * b @ a, rtol=1e-6, atol=1e-6
        )


def test_conv_lora(pipe, tmp_path):
    targets = ("conv_in", "down_blocks.1.attentions.0.proj_in")  # 3x3 and 1x1
    raw = _lora(pipe.c.unet, targets=targets, rank=3)
    unet = copy.deepcopy(pipe.c.unet)
    assert fuse_lora(unet, load_lora(save_lora(tmp_path / "conv.safetensors", raw)), scale=0.3) == list(targets)
    orig, mods = dict(pipe.c.unet.named_modules()), dict(unet.named_modules())
    for name in targets:
        a, b, conv = raw[f"unet.{name}.lora_A.weight"], raw[f"unet.{name}.lora_B.weight"], orig[name]
        w = conv.weight.detach() + 0.3 * (b.flatten(1) @ a.flatten(1)).reshape(conv.weight.shape)
        x = torch.randn(2, conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = torch.nn.functional.conv2d(x, w, conv.bias, conv.stride, conv.padding)
            torch.testing.assert_close(mods[name](x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix, old_naming", [("", False), ("unet.", True), ("", True)])
def test_other_key_layouts_read_the_same(pipe, tmp_path, prefix, old_naming):
    peft = load_lora(save_lora(tmp_path / "peft.safetensors", _lora(pipe.c.unet)))
    other = load_lora(
        save_lora(tmp_path / "other.safetensors", _lora(pipe.c.unet, prefix=prefix, old_naming=old_naming))
    )
    assert peft.keys() == other.keys() and all(torch.equal(peft[k], other[k]) for k in peft)


def test_folder_with_diffusers_file_name(pipe, tmp_path):
    save_lora(tmp_path / "lora" / "pytorch_lora_weights.safetensors", _lora(pipe.c.unet))
    assert len(load_lora(tmp_path / "lora")) == 2 * len(TARGETS)


# ---- generate ----------------------------------------------------------------------------------------
def _fused_pipe(pipe: SDXSPipeline, lora: dict, scale: float) -> SDXSPipeline:
    from dataclasses import replace

    p = SDXSPipeline(replace(pipe.c, unet=copy.deepcopy(pipe.c.unet)), name=pipe.name)
    fuse_lora(p.c.unet, lora, scale=scale)
    return p


def test_generate_with_and_without_lora(pipe, lora_file):
    lora = load_lora(lora_file)
    base = pipe.generate(PROMPTS, seed=3, output="tensor").images
    with_lora = _fused_pipe(pipe, lora, 1.0).generate(PROMPTS, seed=3, output="tensor").images
    zero = _fused_pipe(pipe, lora, 0.0).generate(PROMPTS, seed=3, output="tensor").images
    assert torch.equal(zero, base)
    assert (with_lora - base).abs().max() > 1e-3


def test_cli_generate(lora_file, tmp_path, capsys):
    from sdxs_edge.cli import main

    def gen(name: str, *extra: str) -> bytes:
        assert (
            main(["generate", PROMPTS[0], "--model", "tiny", "--seed", "1", "--out", str(tmp_path / name), *extra]) == 0
        )
        return (tmp_path / name).read_bytes()

    base = gen("base.png")
    assert "lora" not in capsys.readouterr().out
    assert gen("zero.png", "--lora", str(lora_file), "--lora-scale", "0") == base
    assert gen("lora.png", "--lora", str(lora_file), "--lora-scale", "4") != base
    assert f"fused into {len(TARGETS)} U-Net layers, scale 4" in capsys.readouterr().out
    for extra, match in (
        (["--lora-scale", "0.5"], "--lora-scale needs --lora"),
        (["--lora", str(tmp_path / "missing.safetensors")], "does not exist"),
    ):
        assert main(["generate", "x", "--model", "tiny", "--out", str(tmp_path / "bad.png"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad.png").exists()
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--model", "tiny", "--lora", str(lora_file), "--lora-scale", "nan"])
    assert e.value.code == 2 and "finite" in capsys.readouterr().err


# ---- bad input ---------------------------------------------------------------------------------------
def _bad_files(pipe, d: Path) -> list[tuple[Path, str]]:
    name = TARGETS[0]
    good = _lora(pipe.c.unet, targets=(name,))
    cases = []

    def case(fname: str, state: dict, match: str):
        cases.append((save_lora(d / fname, state), match))

    (d / "zero-bytes.safetensors").write_bytes(b"")
    torch.save(good, d / "lora.bin")
    (d / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    cases += [
        (d / "missing.safetensors", "does not exist"),
        (d / "lora.bin", "is not a safetensors file"),
        (d / "garbage.safetensors", "is not a safetensors file"),
        (d / "zero-bytes.safetensors", "is not a safetensors file"),
    ]
    case("empty.safetensors", {}, "has no LoRA keys")
    case("weights.safetensors", {"conv_in.weight": torch.zeros(8, 4, 3, 3)}, "has no LoRA keys")
    case(
        "extra.safetensors",
        {**good, "unet.conv_in.weight": torch.zeros(1)},
        "not a U-Net LoRA weight: 'unet.conv_in.weight'",
    )
    case(
        "te.safetensors",
        {**good, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 16)},
        "text-encoder",
    )
    case("half.safetensors", {k: v for k, v in good.items() if "lora_A" in k}, "has lora_A but no lora_B")
    case("nan.safetensors", {k: v * float("nan") for k, v in good.items()}, "NaN or Inf")
    return cases


def test_bad_files_give_one_line_errors(pipe, tmp_path):
    for path, match in _bad_files(pipe, tmp_path):
        with pytest.raises(LoRAError, match=match) as e:
            load_lora(path)
        assert "\n" not in str(e.value) and isinstance(e.value, SDXSError), (path, str(e.value))


def test_lora_that_does_not_fit_this_unet(pipe):
    name = TARGETS[0]
    good = _lora(pipe.c.unet, targets=(name,))
    a, b = good[f"unet.{name}.lora_A.weight"], good[f"unet.{name}.lora_B.weight"]
    other = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"  # (128, 16)
    cases = [
        (
            {
                **good,
                "unet.mid_block.attentions.0.nope.lora_A.weight": a,
                "unet.mid_block.attentions.0.nope.lora_B.weight": b,
            },
            "LoRA targets module 'mid_block.attentions.0.nope' which this U-Net does not have",
        ),
        ({f"{other}.lora_A.weight": a, f"{other}.lora_B.weight": b}, f"LoRA for module '{other}' does not fit"),
        ({f"{name}.lora_A.weight": torch.zeros(2, 32), f"{name}.lora_B.weight": b}, "does not fit"),
        ({f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": torch.zeros(16, 3)}, "rank 2 in lora_A"),
        ({f"{BLOCK}.norm1.lora_A.weight": a, f"{BLOCK}.norm1.lora_B.weight": b}, "a LayerNorm; only Linear and Conv2d"),
    ]
    unet = copy.deepcopy(pipe.c.unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    for lora, match in cases:
        with pytest.raises(LoRAError, match=match) as e:
            fuse_lora(unet, lora)
        assert "\n" not in str(e.value)
    with pytest.raises(LoRAError, match="finite"):
        fuse_lora(unet, good, scale=float("inf"))
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # checked before any change


# ---- convert -----------------------------------------------------------------------------------------
def _run_onnx_unet(bundle: Path, latent: np.ndarray, context: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    m = json.loads((bundle / "manifest.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle / m["components"]["unet"]["file"]), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"latent": latent, "context": context})[0]


def test_convert_with_lora(pipe, lora_file, tmp_path):
    from converters.api import convert, weights_sha256
    from sdxs_edge.bundle import load_manifest, sha256_path
    from sdxs_edge.components import UNet

    out = convert("tiny", "onnx", "fp32", tmp_path / "lora", lora=lora_file, progress=False)
    m = load_manifest(out, verify=True)
    cfg = m["conversion"]["config"]
    assert cfg["lora"] == str(lora_file) and cfg["lora_sha256"] == sha256_path(lora_file)
    assert cfg["lora_scale"] == 1.0 and cfg["lora_fused_modules"] == len(TARGETS)
    assert m["source"]["sha256"] == weights_sha256(pipe)  # the base model's weights, before the LoRA
    assert m["parity"]["end_to_end"]["image_psnr_db"] is None or m["parity"]["end_to_end"]["image_psnr_db"] > 60
    plain = convert("tiny", "onnx", "fp32", tmp_path / "plain", components=("unet",), progress=False)
    assert load_manifest(plain)["conversion"]["config"]["lora"] is None

    g = torch.Generator().manual_seed(5)
    latent, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 16, generator=g)
    y_lora = _run_onnx_unet(out, latent.numpy(), context.numpy())
    y_plain = _run_onnx_unet(plain, latent.numpy(), context.numpy())
    assert np.abs(y_lora - y_plain).max() > 1e-3
    fused = _fused_pipe(pipe, load_lora(lora_file), 1.0)
    with torch.no_grad():
        ref = UNet(fused.c.unet, pipe.one_step_constants().timestep)(latent, context).numpy()
    np.testing.assert_allclose(y_lora, ref, rtol=1e-4, atol=1e-4)  # lowered from the fused U-Net


def test_runtime_parity_of_a_lora_bundle_uses_the_fused_reference(pipe, lora_file, tmp_path):
    import shutil

    import runtimes
    from converters.api import convert
    from runtimes.parity import run_parity

    f = tmp_path / "style.safetensors"
    shutil.copy(lora_file, f)
    out = convert("tiny", "onnx", "fp32", tmp_path / "lora", lora=f, progress=False)
    with runtimes.load(out, "torch") as ref, runtimes.load(out, "onnxruntime") as rt:
        a = rt.generate_arrays(PROMPTS[0], seed=3).image
        b = ref.generate_arrays(PROMPTS[0], seed=3).image
    np.testing.assert_allclose(a, b, atol=1e-3)  # the reference runs the LoRA the bundle lowered
    rep = run_parity(out, "onnxruntime", prompts=PROMPTS[:1], seeds=[0])
    assert rep["passed"] and float(rep["image"]["psnr_db"]) > 60, rep["image"]
    f.write_bytes(f.read_bytes()[:-8] + bytes(8))  # the recorded LoRA changed after conversion
    with pytest.raises(SDXSError, match="has changed"):
        runtimes.load(out, "torch")


def test_convert_leaves_the_callers_pipeline_alone(pipe, lora_file, tmp_path):
    from converters.api import convert

    before = {k: v.clone() for k, v in pipe.c.unet.state_dict().items()}
    out = convert(
        pipe, "onnx", "fp32", tmp_path / "b", components=("unet",), lora=lora_file, lora_scale=0.5, progress=False
    )
    cfg = json.loads((out / "manifest.json").read_text())["conversion"]["config"]
    assert cfg["lora_scale"] == 0.5 and cfg["lora_fused_modules"] == len(TARGETS)
    assert all(torch.equal(before[k], v) for k, v in pipe.c.unet.state_dict().items())


def test_convert_bad_lora(pipe, tmp_path):
    from converters.api import convert

    # before any model is loaded
    with pytest.raises(LoRAError, match="does not exist"):
        convert("no-such-model", "onnx", "fp32", tmp_path / "b", lora=tmp_path / "missing.safetensors", progress=False)
    with pytest.raises(UnsupportedConversion, match="needs a LoRA file"):
        convert("no-such-model", "onnx", "fp32", tmp_path / "b", lora_scale=0.5, progress=False)
    with pytest.raises(UnsupportedConversion, match="add unet to the components"):
        convert(
            "no-such-model",
            "onnx",
            "fp32",
            tmp_path / "b",
            components=("decoder",),
            lora=tmp_path / "x",
            progress=False,
        )
    # a LoRA for another U-Net: fails after loading, leaves nothing behind
    name = TARGETS[0]
    bad = save_lora(
        tmp_path / "bad.safetensors",
        {
            "unet.mid_block.nope.lora_A.weight": torch.zeros(2, 16),
            "unet.mid_block.nope.lora_B.weight": torch.zeros(16, 2),
        },
    )
    with pytest.raises(LoRAError, match="LoRA targets module 'mid_block.nope' which this U-Net does not have"):
        convert(pipe, "onnx", "fp32", tmp_path / "b", components=("unet",), lora=bad, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]
    assert name in dict(pipe.c.unet.named_modules())


def test_cli_convert_lora_flags(lora_file, tmp_path, capsys):
    from sdxs_edge.cli import main

    base = ["convert", "tiny", "--target", "onnx", "--precision", "fp32", "--out", str(tmp_path / "b")]
    assert main([*base, "--lora", str(lora_file), "--lora-scale", "0.25", "--dry-run"]) == 0
    req = json.loads(capsys.readouterr().out)
    assert (
        req["lora"]["file"] == str(lora_file)
        and req["lora"]["scale"] == 0.25
        and req["lora"]["modules"] == len(TARGETS)
    )
    for extra, match in (
        (["--lora-scale", "2"], "--lora-scale needs --lora"),
        (["--lora", str(tmp_path / "nope.safetensors")], "does not exist"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main([*base, "--lora", str(lora_file), "--lora-scale", "abc"])
    assert e.value.code == 2 and "--lora-scale must be a number" in capsys.readouterr().err
    assert main([*base, "--components", "unet", "--lora", str(lora_file), "--no-progress"]) == 0
    assert f"lora: {lora_file} fused into {len(TARGETS)} U-Net layers (scale 1)" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["conversion"]["config"][
        "lora_fused_modules"
    ] == len(TARGETS)


def test_lora_with_split_heads_leaves_the_callers_pipeline_alone(tmp_path):
    """The LoRA copies the U-Net; split-heads attention then needs the VAE copied too, not the caller's."""
    from converters.api import convert
    from sdxs_edge.attention import SplitHeadAttnProcessor

    teacher = SDXSPipeline.load("tiny-teacher")  # an AutoencoderKL: its decoder has attention
    unet, vae = teacher.c.unet, teacher.c.vae
    f = save_lora(tmp_path / "l.safetensors", _lora(unet))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    out = convert(
        teacher,
        "onnx",
        "fp32",
        tmp_path / "b",
        components=("unet", "decoder"),
        lora=f,
        attention="split-heads",
        progress=False,
    )
    assert json.loads((out / "manifest.json").read_text())["conversion"]["config"]["attention"] == "split-heads"
    assert teacher.c.unet is unet and teacher.c.vae is vae
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    for m in (unet, vae):
        assert m.attn_processors and not any(isinstance(p, SplitHeadAttnProcessor) for p in m.attn_processors.values())
