"""The up-front time estimate (kdray/orchestration/estimate.py): its arithmetic against hand
computation, and a real measurement on this machine."""
from __future__ import annotations

import math
from pathlib import Path

from kdray.config import load_config
from kdray.orchestration import estimate
from kdray.orchestration.pipeline import baseline_config
from kdray.stages import TEACHER, TSD_REFINED, TSD_STUDENT

REPO = Path(__file__).resolve().parents[1]

# seconds per sample: (backbone, train?) -> s
TIMES = {("hrnet_w18_small", True): 3e-3, ("hrnet_w18_small", False): 1e-3,
         ("mobilenetv3_small_100", True): 1e-3, ("mobilenetv3_small_100", False): 2e-4}


def fake_timer(model, size, t, train, joints):
    assert size == (96, 64) and joints == 17
    return TIMES[(model.backbone, train)]


def test_stage_seconds_by_hand():
    cfg = load_config(REPO / "configs" / "demo.yaml")   # teacher 10 ep, students 8, GCN 4
    n, v, su, ld = 4000, 500, estimate.STARTUP_S, estimate.LOAD_S
    # teacher: 10 epochs x 4000 x (3 ms + loading); evaluations at epochs 5 and 10:
    # 2 x 500 x 2 (flip) x 1 ms
    got = estimate.stage_seconds(TEACHER, cfg, n, v, timer=fake_timer)
    assert math.isclose(got, su + 10 * n * (3e-3 + ld) + 2 * v * 2 * 1e-3)
    # stage 1: 8 epochs x 4000 x (1 ms student step + 1 ms teacher forward + loading); evals
    # at 4 and 8
    got = estimate.stage_seconds(TSD_STUDENT, cfg, n, v, timer=fake_timer)
    assert math.isclose(got, su + 8 * n * (1e-3 + 1e-3 + ld) + 2 * v * 2 * 2e-4)
    # the baseline has no teacher to run
    got = estimate.stage_seconds(TSD_STUDENT, baseline_config(cfg), n, v, timer=fake_timer)
    assert math.isclose(got, su + 8 * n * (1e-3 + ld) + 2 * v * 2 * 2e-4)
    # refinement: the frozen student and teacher once over the train set; GCN evals at 2 and 4
    got = estimate.stage_seconds(TSD_REFINED, cfg, n, v, timer=fake_timer)
    assert math.isclose(got, su + n * (2e-4 + 1e-3) * estimate.REFINE_OVERHEAD
                        + 2 * v * 2 * 2e-4)


def test_evaluations_follow_eval_every_and_the_last_epoch():
    assert estimate._evaluations(8, 4) == 2
    assert estimate._evaluations(10, 3) == 4          # 3, 6, 9 and the last
    assert estimate._evaluations(1, 5) == 1


def test_measured_on_this_machine():
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    student = estimate.seconds_per_sample(cfg.student.model, tuple(cfg.data.input_size),
                                          cfg.student.train, True, 17)
    forward = estimate.seconds_per_sample(cfg.student.model, tuple(cfg.data.input_size),
                                          cfg.student.train, False, 17)
    assert 0 < forward < student < 1.0          # a training step costs more than a forward
    secs = estimate.expected_seconds([(TEACHER, cfg), (TSD_STUDENT, cfg)], 64, 24)
    assert all(estimate.STARTUP_S < s < 600 for s in secs)
