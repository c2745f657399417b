"""Style LoRA training and distillation (training/lora.py), the outline style and the style evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdxs_edge import shapes
from sdxs_edge.errors import SDXSError


# ---- the outline style -------------------------------------------------------------------------------------
def test_filled_stream_is_unchanged_by_the_style_option():
    a = next(shapes.train_stream(8, seed=3))
    b = next(shapes.train_stream(8, seed=3, style="filled"))
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert (a.styles == 0).all()


def test_outline_is_a_2px_band_inside_the_filled_shape():
    rng = np.random.default_rng(0)
    for shape in shapes.SHAPES:
        filled = shapes.sample_scene(rng, shape=shape, size="large", position="center")
        outline = shapes.Scene(**{**filled.__dict__, "style": "outline"})
        f, o = shapes.coverage(filled), shapes.coverage(outline)
        assert (o <= f + 1e-6).all(), shape  # the outline never leaves the shape
        assert 0.15 * f.sum() < o.sum() < 0.8 * f.sum(), shape
        if shape != "cross":  # a large square, circle or triangle is hollow in the middle
            cy = int(round(filled.cy + (filled.r / 3 if shape == "triangle" else 0)))
            assert f[cy, int(round(filled.cx))] == 1.0 and o[cy, int(round(filled.cx))] == 0.0, shape


def test_mixed_stream_draws_both_styles_and_is_reproducible():
    a = next(shapes.train_stream(64, seed=1, style="mixed"))
    b = next(shapes.train_stream(64, seed=1, style="mixed"))
    assert np.array_equal(a.images, b.images) and np.array_equal(a.styles, b.styles)
    assert 10 < a.styles.sum() < 54


def test_unknown_style_is_refused():
    with pytest.raises(SDXSError, match="unknown style"):
        shapes.sample_scene(np.random.default_rng(0), style="dotted")


def test_style_evaluator_has_a_style_head():
    from sdxs_edge.evaluate import ClassifierConfig, Evaluator, ShapesClassifier

    ev = Evaluator(ShapesClassifier(ClassifierConfig(style=True)), {})
    pred = ev.classify(next(shapes.train_stream(4, style="mixed")).images)
    assert set(pred) == {*shapes.ATTRIBUTES, "style"} and ev.has_style
    assert not Evaluator(ShapesClassifier(ClassifierConfig()), {}).has_style


def test_committed_style_evaluator_tells_outline_from_filled():
    from sdxs_edge.evaluate import STYLE_EVALUATOR_DIR, Evaluator, accuracy_report

    ev = Evaluator.load(STYLE_EVALUATOR_DIR)
    b = shapes.make_batch(shapes.eval_scenes(256, seed=5, style="mixed"))
    pred = ev.classify(b.images)
    assert (pred["style"] == b.styles).mean() > 0.9
    assert accuracy_report(pred, b.labels)["all_correct"] > 0.9


# ---- peft LoRA helpers -----------------------------------------------------------------------------------
def test_lora_state_fuses_to_the_same_output_as_the_injected_lora():
    from sdxs_edge.lora import fuse_lora
    from sdxs_edge.pipeline import SDXSPipeline
    from training.lora import LORA_TARGETS, add_lora, lora_state, remove_lora

    pipe = SDXSPipeline.load("tiny")
    unet = pipe.c.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([999, 500]), pipe.encode_prompt(["a", "b"])
    params = add_lora(unet, rank=2, alpha=4.0, targets=LORA_TARGETS)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)  # B starts at zero; make the LoRA do something
        injected = unet(x, t, ctx).sample
    state = lora_state(unet, alpha=4.0)
    remove_lora(unet)
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        base = unet(x, t, ctx).sample
    fused = fuse_lora(unet, load_lora_state(state))
    assert fused
    with torch.no_grad():
        out = unet(x, t, ctx).sample
    assert (injected - base).abs().max() > 1e-3
    torch.testing.assert_close(out, injected, atol=1e-4, rtol=1e-4)


def load_lora_state(state):
    from sdxs_edge.lora import _NORMAL, _group

    return {m + _NORMAL[r]: t for m, g in _group(state).items() for r, t in g.items()}


def test_lora_targets_that_match_nothing_are_refused():
    from sdxs_edge.pipeline import SDXSPipeline
    from training.lora import add_lora

    with pytest.raises(ValueError, match="no module"):
        add_lora(SDXSPipeline.load("tiny").c.unet, 2, 2.0, ("not_a_layer",))


# ---- the chain, smoke-sized -------------------------------------------------------------------------------
def test_lora_chain_smoke_writes_a_one_step_lora_that_changes_the_student(tmp_path):
    from sdxs_edge.lora import fuse_lora, load_lora
    from sdxs_edge.pipeline import SDXSPipeline
    from training.lora import run_lora_chain, smoke_lora_chain

    cfg = smoke_lora_chain("models/shapes-teacher", "sdxs_edge/default_model")
    rep = run_lora_chain(cfg, tmp_path / "run")
    assert [m["model"] for m in rep["models"]] == [
        "teacher",
        "teacher + style LoRA",
        "one-step",
        "one-step + distilled LoRA",
    ]
    assert all(0.0 <= m["outline_rate"] <= 1.0 for m in rep["models"])
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "grid.png").is_file()
    student = SDXSPipeline.load("sdxs_edge/default_model")
    ref = student.generate(["a large red square at the center on a white background"], seed=0, output="tensor").images
    n = fuse_lora(student.c.unet, load_lora(tmp_path / "run" / "one-step-lora"))
    out = student.generate(["a large red square at the center on a white background"], seed=0, output="tensor").images
    assert n and (out - ref).abs().max() > 0
    # every stage resumes: a second run trains nothing and reports the same LoRA files
    rep2 = run_lora_chain(cfg, tmp_path / "run", until="lora-distill")
    assert rep2["one_step_lora"] == rep["lora_files"]["one_step"]


def test_cli_train_lora_dry_run(capsys):
    from sdxs_edge.cli import main

    assert main(["train", "lora", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"style": "outline"' in out and '"teacher_takes_lora": true' in out
