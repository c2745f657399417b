"""Folders as current libraries save them (tokenizer.json only) and the generic distillation path
(`sdxs-edge train all --teacher PATH_OR_PRESET --prompts FILE`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdxs_edge import shapes
from sdxs_edge.pipeline import SDXSPipeline

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "shapes-teacher"
PROMPT = "a small red circle at the top on a white background"


def plain_folder(src: Path, dst: Path) -> Path:
    """`src` as diffusers 0.42 + transformers 5 save a StableDiffusionPipeline: no project metadata, and a
    tokenizer folder with tokenizer.json (+ tokenizer_config.json) but no vocab.json or merges.txt."""
    from transformers import CLIPTokenizer

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("sdxs_edge.json", "tokenizer"))
    tok = CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
    tok.save_pretrained(str(dst / "tokenizer"))
    assert sorted(p.name for p in (dst / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    return dst


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdxs_edge.cli", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


@pytest.fixture(scope="module")
def plain_teacher(tmp_path_factory) -> Path:
    return plain_folder(TEACHER, tmp_path_factory.mktemp("t5") / "shapes-teacher")


@pytest.fixture(scope="module")
def plain_tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("t5")
    src = SDXSPipeline.load("tiny").save_pretrained(d / "saved")
    return plain_folder(src, d / "tiny")


def test_tokenizer_json_only_gives_the_same_ids(plain_teacher):
    """Both tokenizers (transformers' and the runtimes' numpy one) read a tokenizer.json-only folder and
    give the original folder's ids on every SHAPES-64 caption (the OpenCLIP pad "!" included)."""
    from runtimes.tokenizer import CLIPBPETokenizer
    from sdxs_edge.tokenizer import load_clip_tokenizer

    caps = shapes.all_captions() + ["a big shiny <|endoftext|> thing!", ""]
    ref = np.array(
        load_clip_tokenizer(TEACHER / "tokenizer")(caps, padding="max_length", max_length=77, truncation=True)[
            "input_ids"
        ]
    )
    via_hf = np.array(
        load_clip_tokenizer(plain_teacher / "tokenizer")(caps, padding="max_length", max_length=77, truncation=True)[
            "input_ids"
        ]
    )
    numpy_tok = CLIPBPETokenizer.from_dir(plain_teacher / "tokenizer")
    assert numpy_tok.pad_token == "!"
    assert np.array_equal(via_hf, ref)
    assert np.array_equal(numpy_tok(caps), ref)


@pytest.mark.heavy
def test_plain_folder_generates_like_the_original(plain_teacher):
    a = SDXSPipeline.load(str(TEACHER)).generate(PROMPT, seed=1, steps=2, guidance=2.0, output="tensor").images
    b = SDXSPipeline.load(str(plain_teacher)).generate(PROMPT, seed=1, steps=2, guidance=2.0, output="tensor").images
    assert np.array_equal(a.numpy(), b.numpy())


@pytest.mark.heavy
def test_folder_without_any_tokenizer_files_is_one_line(plain_tiny, tmp_path):
    bad = Path(shutil.copytree(plain_tiny, tmp_path / "bad"))
    (bad / "tokenizer" / "tokenizer.json").unlink()
    r = _cli("generate", "x", "--model", str(bad), "--out", str(tmp_path / "x.png"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "tokenizer is missing vocab.json + merges.txt (or tokenizer.json)" in r.stderr


@pytest.mark.heavy
def test_cli_generate_eval_convert_run_on_plain_folder(plain_tiny, tmp_path):
    """`generate`, `eval` and `convert` take the tokenizer.json-only folder; the bundle's tokenizer files
    give the original ids and the bundle runs in onnxruntime."""
    from runtimes.tokenizer import CLIPBPETokenizer
    from sdxs_edge.tokenizer import load_clip_tokenizer

    r = _cli("generate", PROMPT, "--model", str(plain_tiny), "--out", str(tmp_path / "g.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "g.png").is_file()
    r = _cli("eval", str(plain_tiny), "--n", "4", "--batch", "4", "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["n"] == 4
    bundle = tmp_path / "bundle"
    r = _cli("convert", str(plain_tiny), "--target", "onnx", "--precision", "fp32", "--out", str(bundle))
    assert r.returncode == 0, r.stderr[-2000:]
    caps = shapes.all_captions()[::7]
    ref = np.array(
        load_clip_tokenizer(plain_tiny / "tokenizer")(caps, padding="max_length", max_length=77, truncation=True)[
            "input_ids"
        ]
    )
    assert np.array_equal(CLIPBPETokenizer.from_dir(bundle / "tokenizer")(caps), ref)
    import runtimes

    with runtimes.load(bundle, "onnxruntime") as s:
        assert s.generate(PROMPT, seed=1).size == (64, 64)


# ---- the chain on any teacher (generic path) ---------------------------------------------------------
def _prompt_file(tmp_path: Path, n: int = 16) -> Path:
    f = tmp_path / "captions.txt"
    f.write_text("\n".join(shapes.all_captions()[:: len(shapes.all_captions()) // n][:n]) + "\n")
    return f


def _tiny_teacher_folder(tmp_path: Path, prediction_type: str) -> Path:
    pipe = SDXSPipeline.load("tiny-teacher")
    pipe.c.scheduler_config["prediction_type"] = prediction_type
    saved = pipe.save_pretrained(tmp_path / "saved")
    return plain_folder(saved, tmp_path / f"tiny-teacher-{prediction_type}")


def _check_distilled(out: Path, prediction: str | None = None) -> None:
    """The chain's folder loads in diffusers' StableDiffusionPipeline and in `generate`; report beside it."""
    import torch
    from diffusers import StableDiffusionPipeline

    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "block-removed (KD)", "one-step, warm-up only", "one-step"}
    assert {"unet-kd", "warmup", "ssd", "decoder"} <= set(report["losses"])
    assert (out / "report.md").is_file() and all((out / m["grid"]).is_file() for m in report["models"].values())
    pipe = StableDiffusionPipeline.from_pretrained(out / "model", safety_checker=None, requires_safety_checker=False)
    img = pipe(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert img.shape[0] == 1 and np.isfinite(img).all()
    assert type(pipe.vae).__name__ == "AutoencoderTiny" and pipe.unet.config.mid_block_type is None
    if prediction:
        teacher_cfg = json.loads((Path(report["teacher"]) / "scheduler" / "scheduler_config.json").read_text())
        assert teacher_cfg["prediction_type"] == prediction


# The end-to-end chains take minutes each on 2 cores: `make test-slow`.
@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_generic_chain_on_tiny_teacher_folder(tmp_path, prediction):
    """`train all --teacher FOLDER --prompts FILE`: the tiny-teacher saved as a plain diffusers folder
    (tokenizer.json only) in epsilon and v prediction, distilled end to end at smoke settings."""
    teacher = _tiny_teacher_folder(tmp_path, prediction)
    out = tmp_path / "run"
    r = _cli(
        "train",
        "all",
        "--smoke",
        "--teacher",
        str(teacher),
        "--prompts",
        str(_prompt_file(tmp_path)),
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    _check_distilled(out, prediction)


@pytest.mark.slow
def test_generic_chain_on_shapes_teacher_copy(tmp_path, plain_teacher):
    """The committed SHAPES-64 teacher as a plain diffusers folder, with a prompt file of captions."""
    out = tmp_path / "run"
    r = _cli(
        "train",
        "all",
        "--smoke",
        "--teacher",
        str(plain_teacher),
        "--prompts",
        str(_prompt_file(tmp_path)),
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    _check_distilled(out)
    r = _cli("generate", PROMPT, "--model", str(out / "model"), "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr[-2000:]


def _bad_teacher(tmp_path: Path, plain_tiny_teacher: Path, kind: str) -> Path:
    bad = Path(shutil.copytree(plain_tiny_teacher, tmp_path / kind))
    if kind == "latent8":
        c = json.loads((bad / "unet" / "config.json").read_text())
        (bad / "unet" / "config.json").write_text(json.dumps({**c, "in_channels": 8, "out_channels": 8}))
    else:
        index = json.loads((bad / "model_index.json").read_text())
        (bad / "model_index.json").write_text(
            json.dumps(
                {
                    **index,
                    "_class_name": "StableDiffusionXLPipeline",
                    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                }
            )
        )
    return bad


@pytest.mark.heavy
def test_generic_chain_bad_input_is_one_line(tmp_path):
    """Non-SD teachers, prompt files, image folders, resolutions and run folders that the chain cannot
    take: one line each, before any training, nothing in an existing run overwritten."""
    teacher = _tiny_teacher_folder(tmp_path, "epsilon")
    prompts = _prompt_file(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    nometa = tmp_path / "nometa"
    nometa.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    (broken / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": PROMPT}) + "\n")
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"teacher": "elsewhere", "prompts": "x"}))
    cases = [
        ((str(_bad_teacher(tmp_path, teacher, "latent8")), prompts), "8-channel latents; supported teachers"),
        (
            (str(_bad_teacher(tmp_path, teacher, "sdxl")), prompts),
            "StableDiffusionXLPipeline folder; supported teachers",
        ),
        ((str(teacher), tmp_path / "missing.txt"), "missing.txt not found"),
        ((str(teacher), tmp_path / "empty.txt"), "has no prompts"),
        ((str(teacher), prompts, "--images", str(nometa)), "has no metadata.jsonl"),
        ((str(teacher), prompts, "--images", str(broken)), "a.png does not load"),
        ((str(teacher), prompts, "--resolution", "72"), "takes multiples of 64"),
        ((str(teacher), prompts, "--out", str(other)), "holds another run"),
    ]
    for (t, p, *extra), message in cases:
        args = ["train", "all", "--smoke", "--teacher", t, "--prompts", str(p), *extra]
        if "--out" not in extra:
            args += ["--out", str(tmp_path / "runs" / message[:8].replace(" ", "_"))]
        r = _cli(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (message, r.stderr[-2000:])
        assert message in r.stderr, (message, r.stderr[-500:])
    assert json.loads((other / "config.json").read_text()) == {"teacher": "elsewhere", "prompts": "x"}
    assert sorted(p.name for p in other.iterdir()) == ["config.json"]


@pytest.mark.slow
def test_generic_chain_on_two_processes(tmp_path):
    """The generic chain under `torchrun` with 2 gloo processes, the tiny teacher, smoke sizes and the
    sd21-512 recipe's parallel choices (DDP for the decoder, U-Net KD and warm-up, FSDP with gradient
    checkpointing for score distillation): rank 0 writes a folder that diffusers loads, and the rerun
    finds every stage done."""
    import os

    prompts = _prompt_file(tmp_path)
    out = tmp_path / "run"
    args = ["train", "all", "--smoke", "--recipe", "sd21-512", "--teacher", "tiny-teacher"]
    args += ["--prompts", str(prompts), "--out", str(out)]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "sdxs_edge.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "rror" in l)[-3000:]
    assert r.stdout.count("# SDXS chain on tiny-teacher") == 1  # rank 0 reports
    config = json.loads((out / "config.json").read_text())
    assert config["ssd"]["parallel"]["fsdp"] and not config["unet_kd"]["parallel"]["fsdp"]
    _check_distilled(out)
    before = (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "resuming" not in r.stdout
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
