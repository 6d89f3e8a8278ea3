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
    from kdray.nn.pose_model import build_pose_model
    from kdray.stages import TEACHER
    cfg = load_config(None, ["data.input_size=[96, 64]", "teacher.model.head_init_scale=1.0",
                             "teacher.model.backbone=mobilenetv3_small_100"])
    torch.manual_seed(0)
    model = build_pose_model(cfg.teacher.model, 17, (96, 64), cfg.data.split_ratio)
    path = tmp_path_factory.mktemp("tiny_ckpt") / "last.pt"
    torch.save({"model": {f"model.{k}": v for k, v in model.state_dict().items()},
                "meta": pose_model_meta(TEACHER, cfg, spec_for("coco"))}, path)
    return path
