"""Ray Train: same results as the plain loop, and a killed worker resumes to the same result."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.config import load_config, with_overrides
from kdray.orchestration import ray_train
from kdray.stages import TEACHER

from .conftest import FAST, SMOKE, fault_env, local_ray

VARYING = ("throughput", "throughput_total", "epoch_seconds")  # wall-clock, not results


def _same(a: dict, b: dict) -> list[str]:
    bad = []
    for k, v in a.items():
        if k in VARYING or not isinstance(v, float):
            continue
        w = b.get(k)
        if not (isinstance(w, float) and (v == w or (math.isnan(v) and math.isnan(w)))):
            bad.append(f"{k}: {v} != {w}")
    return bad


@pytest.fixture
def faulty_ray(tmp_path):
    """A local Ray whose Train workers exit hard at epoch 2's report, after epoch 1's
    checkpoint went to Ray (tests/orchestration/fault_hook); the marker file says it did."""
    marker = tmp_path / "fault.marker"
    with local_ray(fault_env(epoch=2, marker=marker)):
        yield marker


def test_worker_killed_mid_stage_resumes_to_the_uninterrupted_result(faulty_ray, smoke_data,
                                                                      tmp_path):
    cfg = load_config(SMOKE, [*FAST, f"data.root={smoke_data}",
                              "teacher.model.backbone=mobilenetv3_small_100",
                              "teacher.train.epochs=2", "ray.num_workers=1",
                              "ray.max_failures=1"])
    # The uninterrupted reference: the plain loop in this process, with the worker's thread count
    # (ray_train: max(1, int(cpus_per_worker))): results are compared bit for bit below, which
    # holds on one machine only at equal thread counts (reduction splits depend on them).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    try:
        plain = ray_train.train_stage(TEACHER, with_overrides(cfg, {"ray.num_workers": 0}),
                                      tmp_path / "plain", {}, "plain", tmp_path / "ray")
    finally:
        torch.set_num_threads(threads)
    assert [h["epoch"] for h in plain.history] == [1, 2]

    # The worker exits hard at epoch 2's report, after epoch 1's checkpoint went to Ray.
    result = ray_train.train_stage(TEACHER, cfg, tmp_path / "stage", {}, "teacher-fault",
                                   tmp_path / "ray")
    assert faulty_ray.exists(), "the fault was not injected"
    starts = [a["start_epoch"] for a in ray_train.read_attempts(tmp_path / "stage")]
    assert starts == [1, 2], f"expected a second worker group resuming at epoch 2: {starts}"
    assert [h["epoch"] for h in result.history] == [1, 2]
    for ours, ref in zip(result.history, plain.history):
        assert not _same(ref, ours), _same(ref, ours)
    assert (tmp_path / "stage" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "stage" / "metrics.json").is_file()
    assert (tmp_path / "stage" / "loss_curve.png").is_file()
