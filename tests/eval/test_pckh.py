"""MPII PCKh@0.5 on the real sample, against hand-counted per-group percentages.

The sample has 5 persons, all joints labelled except the two ankles (0, 5) of persons 2 and 3:
per joint 5 counted (3 for each ankle); the Mean counts 14 joints (pelvis and thorax left out),
5 x 14 - 4 = 66 joints. No head boxes, so head size = 0.6 x |head_top - upper_neck|.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from kdray.eval import evaluate_file, evaluate_pckh
from kdray.eval.pckh import head_sizes

GROUPS = ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean")


@pytest.fixture
def mpii(real_data):
    return json.loads((real_data / "mpii" / "test_mpii.json").read_text())


def _gt_xy(persons):
    return np.array([p["joints"] for p in persons], np.float64)


def _thr_px(person, factor=0.5):
    """Threshold in pixels: 0.5 x 0.6 x |head_top(9) - upper_neck(8)| (no head boxes)."""
    j = np.array(person["joints"])
    return factor * 0.6 * np.linalg.norm(j[9] - j[8])


def _expected(**groups):
    out = {g: 100.0 for g in GROUPS}
    out.update(groups)
    return out


def _check(out, expected):
    for g in GROUPS:
        assert out[g] == pytest.approx(expected[g]), g


def test_gt_as_predictions_scores_100(mpii, real_data, tmp_path):
    out = evaluate_pckh(real_data / "mpii" / "test_mpii.json", _gt_xy(mpii))
    _check(out, _expected())
    assert out["head_size_source"] == "head_top_upper_neck" and out["skipped_persons"] == 0
    # the CLI's predictions file, in both documented forms
    for preds in ([{"joints": p["joints"]} for p in mpii], [p["joints"] for p in mpii]):
        path = tmp_path / "preds.json"
        path.write_text(json.dumps(preds))
        _check(evaluate_file(real_data / "mpii" / "test_mpii.json", path, "pckh"), _expected())


def test_one_wrist_beyond_threshold(mpii):
    pred = _gt_xy(mpii)
    pred[0, 10, 0] += 1.02 * _thr_px(mpii[0])            # right wrist of person 0: a miss
    # right wrist 4/5 = 80, left wrist 5/5 = 100 -> Wrist 90; Mean 65 of 66
    _check(evaluate_pckh(mpii, pred), _expected(Wrist=90.0, Mean=100 * 65 / 66))


def test_within_threshold_still_counts(mpii):
    pred = _gt_xy(mpii)
    pred[1, 10, 1] += 0.98 * _thr_px(mpii[1])
    d = 0.5 * 0.6 * np.linalg.norm(np.subtract(mpii[1]["joints"][9], mpii[1]["joints"][8]))
    pred[1, 14] += d / np.sqrt(2) * 0.999                # diagonal move just inside
    _check(evaluate_pckh(mpii, pred), _expected())


def test_ankle_group_counts_only_visible_joints(mpii):
    pred = _gt_xy(mpii)
    pred[2, 0] += 1000.0                                  # unlabelled ankle: not counted
    pred[0, 0, 1] += 1.5 * _thr_px(mpii[0])               # labelled right ankle: a miss
    # right ankle counted for persons 0, 1, 4: 2/3; left ankle 3/3 -> Ankle (66.67 + 100) / 2
    _check(evaluate_pckh(mpii, pred), _expected(Ankle=(200 / 3 + 100) / 2, Mean=100 * 65 / 66))


def test_pelvis_and_thorax_are_not_in_mean(mpii):
    pred = _gt_xy(mpii)
    pred[:, 6] += 500.0
    pred[:, 7] += 500.0
    _check(evaluate_pckh(mpii, pred), _expected())
    pred[:, 8] += 500.0                                   # upper neck is in the Mean, in no group
    _check(evaluate_pckh(mpii, pred), _expected(Mean=100 * 61 / 66))


def test_head_boxes_set_the_head_size(mpii):
    gt = copy.deepcopy(mpii)
    for p in gt:                                          # 50 x 50 head boxes: diagonal 70.71
        x, y = p["joints"][9]
        p["headboxes"] = [[x - 25, y - 25], [x + 25, y + 25]]
    thr = 0.5 * 0.6 * np.hypot(50, 50)                   # 21.21 px for every person
    pred = _gt_xy(gt)
    pred[3, 12, 0] += thr - 0.2                           # right shoulder: hit
    pred[3, 13, 0] += thr + 0.2                           # left shoulder: miss
    out = evaluate_pckh(gt, pred)
    _check(out, _expected(Shoulder=(100 + 80) / 2, Mean=100 * 65 / 66))
    assert out["head_size_source"] == "headbox"
    boxes = np.array([p["headboxes"] for p in gt])
    assert evaluate_pckh(mpii, pred, headboxes=boxes)["Shoulder"] == pytest.approx(90.0)
    del gt[0]["headboxes"]
    assert evaluate_pckh(gt, _gt_xy(gt))["head_size_source"] == "mixed"


def test_person_without_head_size_is_skipped(mpii):
    gt = copy.deepcopy(mpii)
    gt[4]["joints_vis"][9] = 0                            # no head top -> no head size
    sizes, source = head_sizes(_gt_xy(gt), np.array([p["joints_vis"] for p in gt]) > 0,
                               [None] * 5)
    assert np.isnan(sizes[4]) and source == "head_top_upper_neck"
    pred = _gt_xy(gt)
    pred[4] += 1000.0                                     # would miss everywhere if counted
    out = evaluate_pckh(gt, pred)
    _check(out, _expected())
    assert out["skipped_persons"] == 1
