"""Fixtures for the orchestration tests: a real local Ray (2 CPUs) and one tiny SynthPose set.

Every test here runs the real thing (Ray Train workers, a sqlite MLflow store in a temp dir) on
configs/smoke.yaml, made smaller still by :data:`FAST`, so the whole folder stays within a few
minutes on a 2-core CPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
# 2 training steps per epoch; fp32 because bf16's first-batch kernel warm-up costs more than the
# whole tiny epoch on CPU.
FAST = ["data.max_train=32", "teacher.train.precision=fp32"]


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """SynthPose at the smoke size, generated once per session (data.root=<this>)."""
    from kdray.config import load_config
    from kdray.stages import ensure_data
    root = tmp_path_factory.mktemp("smoke_data") / "smoke"
    cfg = load_config(SMOKE, [f"data.root={root}"])
    ensure_data(cfg)
    return root


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs for this module, always shut down."""
    import ray
    os.environ.setdefault("KDRAY_PROGRESS", "0")
    ray.init(address="local", num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()
