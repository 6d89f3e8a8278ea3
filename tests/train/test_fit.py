"""The plain fit loop: what trains, what resumes, what fails loudly."""
import json

import cv2
import pytest
import torch

from kdray.config import with_overrides
from kdray.stage_run import build_stage, load_records, run_stage
from kdray.train import CheckpointError, fit, load_checkpoint


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_one_step_changes_only_trainable_parameters(tiny_cfg, tmp_path):
    teacher = run_stage("teacher", tiny_cfg, tmp_path / "teacher")
    ckpt = str(teacher.checkpoint)
    cfg = with_overrides(tiny_cfg, {"data.max_train": 16, "student.train.batch_size": 16})
    built = build_stage("student", cfg, {"teacher": ckpt})
    task = built.task
    assert all(not p.requires_grad for p in task.teacher.parameters())
    trainable = {id(p) for p in task.trainable_parameters()}
    assert not trainable & {id(p) for p in task.teacher.parameters()}
    before_t, before_s = _params(task.teacher), _params(task.model)
    fit(task, built.train_loader, built.train_cfg, tmp_path / "s1")
    assert all(torch.equal(before_t[k], v) for k, v in task.teacher.state_dict().items())
    assert any(not torch.equal(before_s[k], v) for k, v in task.model.state_dict().items()
               if v.dtype.is_floating_point)
    assert task.teacher.training is False  # kept in eval mode while the task trains


def test_resume_equals_uninterrupted_run(tiny_cfg, tmp_path):
    cfg = with_overrides(tiny_cfg, {"teacher.train.epochs": 2, "data.max_train": 32})
    records = load_records(cfg)
    full = run_stage("teacher", cfg, tmp_path / "full", records=records)

    class Crash(Exception):
        pass

    def crash_after_first(metrics, ckpt_dir):
        if metrics["epoch"] == 1:
            raise Crash
    with pytest.raises(Crash):
        run_stage("teacher", cfg, tmp_path / "cut", report=crash_after_first, records=records)
    resumed = run_stage("teacher", cfg, tmp_path / "cut", records=records)
    a = load_checkpoint(tmp_path / "full" / "checkpoints")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints")
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert full.history[-1]["loss"] == resumed.history[-1]["loss"]
    curve = cv2.imread(str(tmp_path / "cut" / "loss_curve.png"))   # the whole history, redrawn
    assert curve.shape == (315, 900, 3)             # figsize (10, 3.5) inches at 90 dpi
    assert (curve == (180, 119, 31)).all(axis=-1).any()   # a line in matplotlib's C0 (BGR)
    saved = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2]


def test_corrupt_and_truncated_checkpoints_fail_clearly(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 1}, good)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    for name, match in [("trunc.pt", "not a readable kdray checkpoint"),
                        ("junk.pt", "not a readable kdray checkpoint"),
                        ("other.pt", "missing field 'model'"), ("absent.pt", "not found")]:
        with pytest.raises(CheckpointError, match=match) as e:
            load_checkpoint(tmp_path / name)
        assert name in str(e.value)


def test_flip_test_is_consistent_on_a_symmetric_input(tiny_cfg):
    """A mirror-symmetric image: flip-averaged logits equal their own mirror (up to the
    left/right swap), so the decoded pose is mirror-symmetric."""
    from kdray.codecs.simcc import SimCCCodec, flip_logits
    from kdray.data.keypoints import COCO
    from kdray.nn.pose_model import build_pose_model
    torch.manual_seed(0)
    model = build_pose_model(tiny_cfg.teacher.model, SimCCCodec((64, 64), 2.0),
                             COCO.flip_index()).eval()
    half = torch.randn(1, 3, 64, 32)
    img = torch.cat([half, half.flip(-1)], -1)          # symmetric about the vertical axis
    with torch.no_grad():
        lx, ly, _ = model.logits(img, flip_test=True)
        fx, fy = flip_logits(lx, ly, COCO.flip_index(), split_ratio=2.0)
    # interior bins (the last k-1 bins repeat an edge value by construction)
    assert torch.allclose(lx[..., :-1], fx[..., :-1], atol=1e-4)
    assert torch.allclose(ly, fy, atol=1e-4)
    # and the image-space prediction of the symmetric image is itself mirror-symmetric:
    # the expected x of joint j and of its mirror partner add up to (W - 1) pixels
    from kdray.codecs.simcc import soft_argmax
    xy = soft_argmax(lx[..., :-1], ly) * torch.tensor([127 / 2.0, 64.0])  # bins -> pixels
    mirrored = xy[:, COCO.flip_index()]
    assert torch.allclose(xy[..., 0] + mirrored[..., 0], torch.full_like(xy[..., 0], 63.0),
                          atol=1e-3)
