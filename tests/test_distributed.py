"""The chain's stages on N processes (`training.dist`): DDP and FSDP under torchrun with gloo on CPU,
checkpoints of sharded models, the FSDP wrapping policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "rror" in l)[-3000:]
    return r


def test_fsdp_wrapping_policy():
    """Each U-Net down / up block and the mid block is its own shard unit; the SD-2.1 U-Net has 9, its
    block-removed SDXS student 6 (no mid block, one stage fewer each way)."""
    from diffusers import UNet2DConditionModel

    from sdxs_edge.presets import block_removed, get_preset
    from training.dist import fsdp_units

    with torch.device("meta"):
        teacher = UNet2DConditionModel(**get_preset("sd21-base").unet)
        student = UNet2DConditionModel(**block_removed(teacher.config))
    assert fsdp_units(teacher) == [
        *(f"down_blocks.{i}" for i in range(4)),
        *(f"up_blocks.{i}" for i in range(4)),
        "mid_block",
    ]
    assert fsdp_units(student) == [*(f"down_blocks.{i}" for i in range(3)), *(f"up_blocks.{i}" for i in range(3))]
    assert fsdp_units(torch.nn.Linear(2, 2)) == []


def test_feature_kd_pairs_compare_at_real_size():
    """At 512x512 the student's last down stage (no downsampler) is 16x16 where the teacher's is 8x8:
    the feature loss compares that pair at 8x8 instead of failing (or, at toy sizes, broadcasting)."""
    from diffusers import UNet2DConditionModel

    from sdxs_edge.presets import SDXS_FEATURE_PAIRS, block_removed, get_preset
    from training.unet_kd import FeatureTap, feature_mse

    with torch.device("meta"):
        teacher = UNet2DConditionModel(**get_preset("sd21-base").unet)
        student = UNet2DConditionModel(**block_removed(teacher.config))
        args = (torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 1024))
    tap_s, tap_t = FeatureTap(student, SDXS_FEATURE_PAIRS.keys()), FeatureTap(teacher, SDXS_FEATURE_PAIRS.values())
    with torch.no_grad():
        student(*args), teacher(*args)
    sizes = {s: (tap_s.out[s].shape[-1], tap_t.out[t].shape[-1]) for s, t in SDXS_FEATURE_PAIRS.items()}
    assert {s for s, (a, b) in sizes.items() if a != b} == {"down_blocks.2"} and sizes["down_blocks.2"] == (16, 8)
    for s, t in SDXS_FEATURE_PAIRS.items():
        assert feature_mse(tap_s.out[s], tap_t.out[t]).shape == ()
    a, b = torch.ones(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)
    a[..., :2, :2] = 3.0  # pooled: top-left cell 3, the others 1
    assert feature_mse(a, b).item() == (9 + 3 * 1) / 4


def test_optimizer_state_by_parameter_name_round_trips():
    """A sharded model's optimizer state is keyed by parameter name (dots inside): it survives the
    tensors + JSON checkpoint format as index-keyed state does."""
    from training.loop import _optimizer_from_tensors, _optimizer_to_tensors

    m = torch.nn.Sequential(torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(m.parameters(), 1e-2)
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    by_index = opt.state_dict()
    names = {0: "0.weight", 1: "0.bias"}
    by_name = {
        "state": {names[i]: st for i, st in by_index["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in by_index["param_groups"]],
    }
    for sd in (by_index, by_name):
        tensors, scalars = _optimizer_to_tensors(sd)
        back = _optimizer_from_tensors(tensors, json.loads(json.dumps(scalars)))
        assert back["param_groups"] == json.loads(json.dumps(sd["param_groups"]))
        assert back["state"].keys() == sd["state"].keys()
        for k, st in sd["state"].items():
            assert all(torch.equal(back["state"][k][f], v) for f, v in st.items())


@pytest.mark.heavy
def test_one_stage_on_two_processes_ddp_and_fsdp(tmp_path):
    """U-Net KD under torchrun with 2 gloo processes, DDP and FSDP (gradient accumulation 2, FSDP with
    gradient checkpointing), each stopped after 2 steps and resumed to 4: the weights end where one
    process with the same global batch ends; the sharded model's checkpoint is one full safetensors file
    per module, and the stage hands back a plain, unsharded model equal to it."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "tests"))
    import dist_stage

    _, _, init, _ = dist_stage.setup()
    torch.set_num_threads(1)
    one = dist_stage.run(tmp_path / "one", "one", 4).state_dict()
    r = _torchrun(str(ROOT / "tests" / "dist_stage.py"), str(tmp_path), "ddp", "fsdp")
    assert r.stdout.count("[unet-kd] resuming from") == 2, r.stdout[-2000:]
    result = json.loads((tmp_path / "result-ddp-fsdp.json").read_text())
    moved = max((one[k] - v).abs().max().item() for k, v in init.state_dict().items())
    assert moved > 1e-4
    for mode in ("ddp", "fsdp"):
        assert result[mode] == {"sharded": False, "checkpointing": False, "matches_checkpoint": True}, mode
        saved = load_file(str(tmp_path / mode / "checkpoints" / "step-0000004" / "unet.safetensors"))
        assert saved.keys() == one.keys()
        diff = max((saved[k] - one[k]).abs().max().item() for k in one)
        assert diff <= 0.02 * moved, (mode, diff, moved)
        optim = load_file(str(tmp_path / mode / "checkpoints" / "step-0000004" / "optim-opt.safetensors"))
        assert sum(v.numel() for k, v in optim.items() if k.endswith(".exp_avg")) == sum(
            v.numel() for v in one.values()
        )


# ---- the real-size recipes --------------------------------------------------------------------------------
def test_docs_plan_is_the_generated_one():
    """docs/any-teacher.md's memory and time plan is `plan_markdown` of each recipe, and its figures are
    the layouts': SD-2.1-base's 0.87B U-Net, its 0.32B block-removed student."""
    import re

    from training.recipes import RECIPES, plan_markdown, stage_plan

    doc = (ROOT / "docs" / "any-teacher.md").read_text()
    for name in RECIPES:
        section = re.search(rf"<!-- plan:{name} -->\n(.*?)<!-- /plan -->", doc, re.S)
        assert section, name
        assert section.group(1) == plan_markdown(name), f"regenerate with: python -m training.recipes ({name})"
    kd = next(r for r in stage_plan("sd21-512") if r["stage"] == "unet-kd")
    assert 318e6 < kd["trainable"] < 320e6 and kd["micro"] == 256 // 8 // 2


def test_recipe_sets_every_stage(tmp_path):
    """`--recipe sd21-512` gives each stage its steps, batch, lr, budget and DDP / FSDP choice; with
    --smoke only the parallel settings; without --prompts it is refused."""
    from training.chain import ChainConfig, smoke_chain
    from training.recipes import RECIPES, recipe_chain

    r, cfg = RECIPES["sd21-512"], recipe_chain("sd21-512", ChainConfig())
    for stage in ("decoder", "unet_kd", "warmup", "ssd", "decoder_adapt"):
        got, want = getattr(cfg, stage), getattr(r, stage)
        assert (got.steps, got.batch, got.lr, got.parallel) == (want.steps, want.batch, want.lr, want.parallel)
        assert got.max_seconds == want.hours * 3600
    assert cfg.ssd.parallel.fsdp and not cfg.unet_kd.parallel.fsdp and cfg.resolution == 512
    smoke = recipe_chain("sd21-512", smoke_chain(), smoke=True)
    assert smoke.ssd.steps == smoke_chain().ssd.steps and smoke.ssd.parallel.fsdp
    r = subprocess.run(
        [sys.executable, "-m", "sdxs_edge.cli", "train", "all", "--recipe", "sd21-512", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--recipe sd21-512 goes with --teacher PATH_OR_PRESET --prompts FILE" in r.stderr
    assert not (tmp_path / "x").exists()


def test_run_folder_resumes_only_its_own_config(tmp_path):
    """An --out holding another run's config (or checkpoints without a config) is refused before
    anything is written; the same config, or one differing only in threads / eval sizes, resumes."""
    from dataclasses import asdict, replace

    from training.chain import check_run_folder, smoke_chain
    from training.generic import TrainingInputError
    from training.recipes import recipe_chain

    cfg = replace(smoke_chain(), teacher="tiny-teacher", prompts="captions.txt")
    run = tmp_path / "run"
    (run / "decoder" / "checkpoints" / "step-0000002").mkdir(parents=True)
    with pytest.raises(TrainingInputError, match="holds no chain run"):
        check_run_folder(cfg, run)
    (run / "config.json").write_text(json.dumps(asdict(cfg), default=str))
    check_run_folder(replace(cfg, threads=1, eval_n=4), run)
    with pytest.raises(TrainingInputError, match="config differs in ssd, unet_kd, warmup"):
        check_run_folder(recipe_chain("sd21-512", cfg, smoke=True), run)
    with pytest.raises(TrainingInputError, match="differs in teacher"):
        check_run_folder(replace(cfg, teacher="other"), run)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "decoder"]
