"""ControlNet distillation (`sdxs-edge train controlnet`): the smoke run end to end, and the student loss on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    """Tiny random teacher, its block-removed one-step student, teacher ControlNet, and 4 triplets."""
    from sdxs_edge.controlnet import SHAPES_EMBEDDING, controlnet_for_unet
    from sdxs_edge.pipeline import SDXSPipeline
    from training.controlnet import TripletConfig, load_student, make_triplets

    torch.manual_seed(0)
    teacher = SDXSPipeline.load("tiny-teacher")
    student = load_student("block-removed", teacher)
    t_cn = controlnet_for_unet(teacher.c.unet, SHAPES_EMBEDDING)
    triplets = make_triplets(TripletConfig(n=4, steps=2, batch=4), teacher, student)
    return teacher, student, t_cn, triplets


def test_triplet_control_is_canny_of_the_teachers_own_sample(tiny):
    from sdxs_edge.control import canny
    from training.controlnet import _to_uint8

    teacher, _, _, trip = tiny
    assert trip["noise"].shape == trip["x0"].shape == (4, 4, 8, 8) and trip["edges"].shape == (4, 64, 64)
    again = canny(_to_uint8(teacher.decode(trip["x0"])))
    assert (again == trip["edges"].numpy()).all()


def test_zero_initialised_controlnet_leaves_the_one_step_output_unchanged(tiny):
    """With fresh_noise=0 and the output zero convolutions untouched (the woken control encoder is not zero),
    output KD is exactly the plain student's error."""
    from sdxs_edge.control import edges_to_control
    from sdxs_edge.controlnet import SHAPES_EMBEDDING, controlnet_for_unet
    from sdxs_edge.sampler import sample_one_step
    from training.controlnet import ControlNetKDLoss, wake_conditioning

    teacher, student, t_cn, trip = tiny
    s_cn = wake_conditioning(
        controlnet_for_unet(student.c.unet, SHAPES_EMBEDDING), torch.from_numpy(edges_to_control(trip["edges"].numpy()))
    )
    loss_fn = ControlNetKDLoss(student, s_cn, teacher, t_cn, feature_weight=0.0, fresh_noise=0.0)
    _, logs = loss_fn(trip, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ctx = student.c.text_encoder(trip["ids_student"].long())[0]
        plain = sample_one_step(
            lambda x, t, c: student.c.unet(x, t, c).sample, trip["noise"], ctx, student.one_step_constants()
        )
    assert logs["out_kd"] == pytest.approx(torch.nn.functional.mse_loss(plain, trip["x0"]).item(), rel=1e-5)


def test_fresh_noise_changes_the_students_input(tiny):
    from sdxs_edge.controlnet import SHAPES_EMBEDDING, controlnet_for_unet
    from training.controlnet import ControlNetKDLoss

    teacher, student, t_cn, trip = tiny
    s_cn = controlnet_for_unet(student.c.unet, SHAPES_EMBEDDING)
    losses = [
        ControlNetKDLoss(student, s_cn, teacher, t_cn, 0.0, f)(trip, torch.Generator().manual_seed(0))[1]["out_kd"]
        for f in (0.0, 1.0)
    ]
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


@pytest.mark.heavy
def test_student_controlnet_loss_decreases_on_a_fixed_batch(tiny):
    """The student ControlNet (U-Net frozen) fits a fixed tiny batch: its loss drops by over 20% in 40 steps.

    Random tiny U-Nets start far off (x0 errors in the hundreds, as sigma(999) ~ 14.6 multiplies the epsilon
    error), and only the ControlNet's residuals can move the output."""
    from sdxs_edge.control import edges_to_control
    from sdxs_edge.controlnet import SHAPES_EMBEDDING, controlnet_for_unet
    from training.controlnet import ControlNetKDLoss, wake_conditioning

    teacher, student, t_cn, trip = tiny
    torch.manual_seed(0)
    s_cn = wake_conditioning(
        controlnet_for_unet(student.c.unet, SHAPES_EMBEDDING), torch.from_numpy(edges_to_control(trip["edges"].numpy()))
    ).train()
    frozen = {k: v.clone() for k, v in student.c.unet.state_dict().items()}
    loss_fn = ControlNetKDLoss(student, s_cn, teacher, t_cn, feature_weight=0.1, fresh_noise=0.5)
    opt = torch.optim.Adam(s_cn.parameters(), 1e-2)
    losses = []
    for _ in range(40):
        loss, _ = loss_fn(trip, torch.Generator().manual_seed(0))  # same batch, same fresh noise every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    loss_fn.close()
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(v, student.c.unet.state_dict()[k]) for k, v in frozen.items()), "the U-Net must stay frozen"


def test_woken_control_encoder_makes_the_residuals_depend_on_the_control(tiny):
    """diffusers' default init passes a sparse edge map to the residuals at ~1e-5 of their scale (no learning
    signal); after `wake_conditioning` the control encoder's output has the requested scale."""
    from sdxs_edge.control import edges_to_control
    from sdxs_edge.controlnet import SHAPES_EMBEDDING, controlnet_for_unet
    from training.controlnet import wake_conditioning

    _, student, _, trip = tiny
    control = torch.from_numpy(edges_to_control(trip["edges"].numpy()))
    cn = wake_conditioning(controlnet_for_unet(student.c.unet, SHAPES_EMBEDDING), control, target_std=0.5)
    with torch.no_grad():
        emb = cn.controlnet_cond_embedding(control)
    assert emb.std().item() == pytest.approx(0.5, rel=1e-3)
    assert all(float(p.detach().abs().max()) == 0.0 for p in cn.controlnet_down_blocks.parameters()), (
        "output zero convs must stay zero"
    )


def test_feature_pairs_refuse_unets_of_another_layout():
    from sdxs_edge.errors import SDXSError
    from sdxs_edge.pipeline import SDXSPipeline
    from training.controlnet import feature_pairs

    with pytest.raises(SDXSError, match="feature pair"):
        feature_pairs(SDXSPipeline.load("tiny").c.unet, SDXSPipeline.load("tiny-teacher").c.unet)


@pytest.mark.heavy
def test_smoke_run_end_to_end_writes_loadable_controlnets(tmp_path):
    """`train controlnet --smoke`: teacher ControlNet -> triplets -> student ControlNet -> report, in seconds; a rerun resumes."""
    import time

    from sdxs_edge.controlnet import load_controlnet
    from sdxs_edge.pipeline import SDXSPipeline
    from training.controlnet import load_student

    out = tmp_path / "cn"
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "sdxs_edge.cli", "train", "controlnet", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert time.time() - t0 < 60, "the smoke run must stay well under a minute"
    rep = json.loads((out / "report" / "report.json").read_text())
    assert set(rep["models"]) == {
        "teacher, no ControlNet",
        "teacher + teacher ControlNet",
        "one-step, no ControlNet",
        "one-step + student ControlNet",
    }
    for r_ in rep["models"].values():
        assert 0.0 <= r_["consistent"]["edge_iou"] <= 1.0 and 0.0 <= r_["other-scene"]["all_correct"] <= 1.0
    assert (out / "report" / "grid.png").is_file() and "edge IoU" in (out / "report" / "report.md").read_text()
    teacher = SDXSPipeline.load("tiny-teacher")
    student = load_student("block-removed", teacher)
    t_cn = load_controlnet(out / "export" / "shapes-teacher-controlnet-canny", teacher.c.unet)
    s_cn = load_controlnet(out / "export" / "shapes-controlnet-canny", student.c.unet)
    assert t_cn.config.block_out_channels == teacher.c.unet.config.block_out_channels
    img = (
        student.attach_controlnet(s_cn)
        .generate(
            "a large red circle at the center on a white background",
            control_image=torch.zeros(1, 3, 64, 64),
            output="tensor",
        )
        .images
    )
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    r2 = subprocess.run(
        [sys.executable, "-m", "sdxs_edge.cli", "train", "controlnet", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r2.returncode == 0 and "resuming" not in r2.stderr and "teacher-controlnet:" not in r2.stderr, (
        "a finished run retrains nothing"
    )


def test_controlnet_dry_run_prints_config():
    r = subprocess.run(
        [sys.executable, "-m", "sdxs_edge.cli", "train", "controlnet", "--dry-run", "--steps", "7"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-1000:]
    cfg = json.loads(r.stdout)
    assert cfg["student_cn"]["steps"] == 7 and cfg["teacher"].endswith("models/shapes-teacher") and cfg["threads"] == 1
