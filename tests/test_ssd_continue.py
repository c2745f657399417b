"""Longer score distillation of a trained one-step model: fresh input noise for the score-distillation
samples, and the checkpoint curve (`training.ssd_curve`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "sdxs_edge" / "default_model"


def _inputs_of_a_score_distillation(tmp_path: Path, monkeypatch, fresh: bool) -> tuple[list, dict]:
    """The student's input noise per step of a 2-step run on the tiny preset, and the pairs."""
    from sdxs_edge import sampler
    from sdxs_edge.pipeline import SDXSPipeline
    from training import onestep

    pipe = SDXSPipeline.load("tiny")
    pairs = onestep.ode_pair_chunks(pipe, tmp_path / "pairs", 8, steps=2, guidance=2.0, chunk=8, batch=8)
    seen, real = [], onestep.one_step_x0
    monkeypatch.setattr(onestep, "one_step_x0", lambda s, z, ctx, c: seen.append(z.clone()) or real(s, z, ctx, c))
    sched = {k: v for k, v in pipe.c.scheduler_config.items() if not k.startswith("_")}
    cfg = onestep.SSDConfig(steps=2, batch=8, alpha_start=0.5, alpha_end=0.5, fresh_noise=fresh, log_every=1)
    onestep.score_distill(
        cfg,
        tmp_path / f"ssd-{fresh}",
        pipe.c.unet,
        pipe.c.text_encoder,
        SDXSPipeline.load("tiny").c.unet,
        pairs,
        sampler.one_step_constants({**sched, "prediction_type": "v_prediction"}, pipe.latent_scaling),
        torch.from_numpy(sampler.alphas_cumprod(pipe.c.scheduler_config)),
        pipe.tokenize([""])[0],
    )
    return seen, pairs


def test_fresh_noise_replaces_the_input_noise_of_score_distillation_samples_only(tmp_path, monkeypatch):
    from training.onestep import SSDConfig, _ssd_draws

    cfg = SSDConfig(batch=8, alpha_start=0.5, alpha_end=0.5)
    for fresh in (False, True):
        seen, pairs = _inputs_of_a_score_distillation(tmp_path, monkeypatch, fresh)
        assert len(seen) == 2
        for k, z in enumerate(seen):
            (idx, t, _, new), _ = _ssd_draws(cfg, k, 0, 8, 1000, pairs["noise"].shape[1:])
            sd = t <= 0.5 * 1000
            assert 0 < int(sd.sum()) < 8  # both segments in the batch
            assert torch.equal(z[~sd], pairs["noise"][idx][~sd])  # feature matching: the pair's noise
            assert torch.equal(z[sd], new[sd] if fresh else pairs["noise"][idx][sd])


def _fake_checkpoint(root: Path, step: int, state: dict) -> None:
    from safetensors.torch import save_file

    ckpt = root / "checkpoints" / f"step-{step:07d}"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "unet.safetensors"))
    (ckpt / "state.json").write_text(json.dumps({"step": step}))


def test_ssd_curve_scores_each_checkpoint_once_and_saves_a_loadable_model(tmp_path):
    from sdxs_edge.errors import SDXSError
    from sdxs_edge.pipeline import SDXSPipeline
    from training import ssd_curve

    base = SDXSPipeline.load(DEFAULT)
    state = base.c.unet.state_dict()
    _fake_checkpoint(tmp_path, 200, state)
    _fake_checkpoint(tmp_path, 400, {k: v * 0 for k, v in state.items()})  # a broken U-Net scores worse
    rows = ssd_curve.score_new_checkpoints(tmp_path, base, n=16)
    assert [r["step"] for r in rows] == [200, 400]
    assert rows[0] == {"step": 200, **ssd_curve.score(base, 16)}
    assert rows[1]["all_correct"] < rows[0]["all_correct"]
    assert ssd_curve.score_new_checkpoints(tmp_path, base, n=16) == []  # nothing scored twice
    assert len((tmp_path / "curve.jsonl").read_text().splitlines()) == 2
    out = tmp_path / "candidate"
    assert ssd_curve.main([str(tmp_path), "--base", str(DEFAULT), "--save", "200", str(out)]) == 0
    saved = SDXSPipeline.load(out)
    assert saved.default_steps == 1 and saved.c.scheduler_config["prediction_type"] == "v_prediction"
    for k, v in saved.c.unet.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    _fake_checkpoint(tmp_path / "bad", 1, {"conv_in.weight": torch.zeros(1)})
    with pytest.raises(SDXSError, match="holds no U-Net of the base model's layout"):
        ssd_curve.score_new_checkpoints(tmp_path / "bad", base, n=16)
    with pytest.raises(SDXSError, match="was not scored"):
        ssd_curve.main([str(tmp_path), "--base", str(DEFAULT), "--save", "600", str(tmp_path / "x")])
