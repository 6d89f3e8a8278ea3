"""Shared fixtures. ``real_data``: the real sample files (shared/data/real, see its README).

The repository and ``shared/`` are siblings (CI clones the repo into another folder with shared/
beside it), so the path is computed from the repo root's parent. Missing samples fail loudly:
the readers and evaluators must meet real formats, a silent skip would hide that.
"""
from __future__ import annotations

from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "README.md").is_file():
        pytest.fail(f"real sample data not found at {REAL_DATA}: the repository must sit beside "
                    f"a shared/ folder holding data/real (coco, crowdpose, mpii)", pytrace=False)
    return REAL_DATA


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A tiny SynthPose set (64 train / 24 val persons), generated once per test session."""
    from kdray.data.synthpose import generate
    root = tmp_path_factory.mktemp("synthpose")
    generate(root, train=64, val=24, seed=0, workers=1, progress=False)
    return root


@pytest.fixture
def tiny_cfg(synth_root):
    """Smoke settings on the tiny set: 64x64 crops, MobileNetV3 nets, 1-epoch stages."""
    from kdray.config import load_config
    return load_config(Path(__file__).parents[1] / "configs" / "smoke.yaml", [
        f"data.root={synth_root}", "data.synth.train=64", "data.synth.val=24",
        "teacher.model.backbone=mobilenetv3_small_100",
        "teacher.train.batch_size=16", "student.train.batch_size=16"])


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained kdray checkpoint (MobileNetV3-small SimCC, 96x64, COCO-17) whose head starts
    at PyTorch's init scale, so its logits have clear peaks (inference plumbing tests)."""
    import torch

    from kdray.config import load_config
    from kdray.data.keypoints import spec_for
    from kdray.inference import pose_model_meta
    from kdray.stages import TEACHER
    cfg = load_config(None, ["data.input_size=[96, 64]", "teacher.model.head_init_scale=1.0",
                             "teacher.model.backbone=mobilenetv3_small_100"])
    torch.manual_seed(0)
    model = TEACHER.pose_model(cfg, spec_for("coco"))
    path = tmp_path_factory.mktemp("tiny_ckpt") / "last.pt"
    torch.save({"model": {f"model.{k}": v for k, v in model.state_dict().items()},
                "meta": pose_model_meta(TEACHER, cfg, spec_for("coco"))}, path)
    return path


def assert_poses_drawn(image, out, printed: dict) -> None:
    """The PNG is the input image with every printed joint drawn: same size, and pixels changed
    within 8 px of each joint that lies inside the image (a filled dot or a ring, radius <= 5)."""
    import cv2
    before, after = cv2.imread(str(image)), cv2.imread(str(out))
    assert after.shape == before.shape
    changed = (after != before).any(axis=-1)
    h, w = changed.shape
    joints = [(x, y) for person in printed["keypoints"] for x, y, _ in person
              if 0 <= x < w and 0 <= y < h]
    assert printed["persons"] == len(printed["keypoints"]) >= 1 and joints
    for x, y in joints:
        x, y = int(round(x)), int(round(y))
        assert changed[max(0, y - 8):y + 9, max(0, x - 8):x + 9].any(), (x, y)
