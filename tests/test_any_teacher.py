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
    return subprocess.run([sys.executable, "-m", "sdxs_edge.cli", *args], capture_output=True, text=True, timeout=600, cwd=cwd)


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
    ref = np.array(load_clip_tokenizer(TEACHER / "tokenizer")(caps, padding="max_length", max_length=77, truncation=True)["input_ids"])
    via_hf = np.array(load_clip_tokenizer(plain_teacher / "tokenizer")(caps, padding="max_length", max_length=77, truncation=True)["input_ids"])
    numpy_tok = CLIPBPETokenizer.from_dir(plain_teacher / "tokenizer")
    assert numpy_tok.pad_token == "!"
    assert np.array_equal(via_hf, ref)
    assert np.array_equal(numpy_tok(caps), ref)


def test_plain_folder_generates_like_the_original(plain_teacher):
    a = SDXSPipeline.load(str(TEACHER)).generate(PROMPT, seed=1, steps=2, guidance=2.0, output="tensor").images
    b = SDXSPipeline.load(str(plain_teacher)).generate(PROMPT, seed=1, steps=2, guidance=2.0, output="tensor").images
    assert np.array_equal(a.numpy(), b.numpy())


def test_folder_without_any_tokenizer_files_is_one_line(plain_tiny, tmp_path):
    bad = Path(shutil.copytree(plain_tiny, tmp_path / "bad"))
    (bad / "tokenizer" / "tokenizer.json").unlink()
    r = _cli("generate", "x", "--model", str(bad), "--out", str(tmp_path / "x.png"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "tokenizer is missing vocab.json + merges.txt (or tokenizer.json)" in r.stderr


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
    ref = np.array(load_clip_tokenizer(plain_tiny / "tokenizer")(caps, padding="max_length", max_length=77, truncation=True)["input_ids"])
    assert np.array_equal(CLIPBPETokenizer.from_dir(bundle / "tokenizer")(caps), ref)
    import runtimes

    with runtimes.load(bundle, "onnxruntime") as s:
        assert s.generate(PROMPT, seed=1).size == (64, 64)
