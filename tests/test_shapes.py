"""SHAPES-64 world, tokenizer and evaluator."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from sdxs_edge import shapes
from sdxs_edge.errors import SDXSError


def test_grammar_has_1152_distinct_captions_and_parses_back():
    caps = shapes.all_captions()
    assert len(caps) == len(set(caps)) == 1152
    assert "a large cyan triangle at the bottom left on a black background" in caps
    for c in caps[::97]:
        assert shapes.caption(**shapes.parse_caption(c)) == c
    with pytest.raises(SDXSError):
        shapes.parse_caption("a large cyan hexagon at the bottom left on a black background")


def test_render_follows_the_spec():
    s = shapes.Scene("large", "cyan", "triangle", "center", "black", r=13.0, cx=32.0, cy=32.0)
    img = shapes.render(s)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[40, 32]) == shapes.COLORS["cyan"]  # inside, near the base
    assert tuple(img[0, 0]) == shapes.BACKGROUNDS["black"]
    # Apex up: the row just below the apex is narrower than the row above the base.
    cov = shapes.coverage(s)
    assert cov[22].sum() < cov[43].sum()
    cross = shapes.coverage(shapes.Scene("large", "red", "cross", "center", "white", 12.0, 32.0, 32.0))
    assert cross[32, 32] == 1.0 and cross[22, 22] == 0.0  # arms, not the corners


def test_sampled_attributes_stay_in_range():
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = shapes.sample_scene(rng)
        lo, hi = shapes.SIZES[s.size]
        px, py = shapes.POSITIONS[s.position]
        assert lo <= s.r <= hi and abs(s.cx - px) <= 2 and abs(s.cy - py) <= 2


def test_streams_are_deterministic_and_disjoint():
    a = next(shapes.train_stream(8, seed=1, start=5))
    b = next(shapes.train_stream(8, seed=1, start=5))
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    ev = shapes.make_batch(shapes.eval_scenes(8))
    assert not np.array_equal(ev.images, next(shapes.train_stream(8, seed=0)).images)


def test_tokenizer_matches_open_clip_on_grammar():
    from sdxs_edge.tokenizer import bpe_vocab_path, load_clip_tokenizer, write_clip_tokenizer

    pytest.importorskip("ftfy", reason="open_clip's tokenizer module needs ftfy (test extra)")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", bpe_vocab_path().parent / "tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    reference = mod.SimpleTokenizer()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ours = load_clip_tokenizer(write_clip_tokenizer(d))
    caps = shapes.all_captions()[::7]
    words = sorted({w for c in shapes.all_captions() for w in c.split()})
    for text in caps + words:
        ref = reference(text)[0].tolist()
        ref = ref[: ref.index(49407) + 1]
        assert ours(text).input_ids == ref, text


def test_committed_evaluator_is_accurate_on_renders():
    from sdxs_edge.evaluate import Evaluator, accuracy_report

    ev = Evaluator.load()
    b = shapes.make_batch(shapes.eval_scenes(256, seed=3))
    acc = accuracy_report(ev.classify(b.images), b.labels)
    assert acc["all_correct"] >= 0.98, acc


def test_fid_shapes_separates_distributions():
    from sdxs_edge.evaluate import Evaluator, frechet_distance

    ev = Evaluator.load()
    a = ev.features(shapes.make_batch(shapes.eval_scenes(256, seed=4)).images)
    b = ev.features(shapes.make_batch(shapes.eval_scenes(256, seed=5)).images)
    noise = np.random.default_rng(0).integers(0, 255, (256, 64, 64, 3), dtype=np.uint8)
    assert frechet_distance(a, b) < 0.2 * frechet_distance(a, ev.features(noise))


def test_eval_prompt_file_rejects_non_grammar_line(tmp_path):
    from sdxs_edge.evaluate import read_prompt_file

    f = tmp_path / "p.txt"
    f.write_text("a small red circle at the top on a white background\na photo of a cat\n")
    with pytest.raises(SDXSError, match=r"p.txt:2: not a SHAPES-64 caption"):
        read_prompt_file(f)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SDXSError, match="not a UTF-8 text file"):
        read_prompt_file(tmp_path / "bin.txt")
