"""COCO / CrowdPose OKS AP on the real samples, against hand-computed OKS values.

OKS = mean over the GT's labelled joints of exp(-d^2 / (2 s^2 k^2)), k = 2 sigma; s^2 = GT area
(COCO) or 0.53 w h (CrowdPose). A single matched person scores AP_t = 1 when OKS >= t, so
AP = 100 x (share of the ten thresholds 0.50:0.05:0.95 that its OKS reaches).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from kdray.data.keypoints import COCO, CROWDPOSE
from kdray.data.coco import DataError
from kdray.eval import crowd_index_buckets, evaluate_coco, evaluate_file, to_coco_results

THRS = np.linspace(0.5, 0.95, 10)


def _gt(real_data, name):
    folder, file = {"coco": ("coco", "test_coco.json"),
                    "crowdpose": ("crowdpose", "test_crowdpose.json")}[name]
    return json.loads((real_data / folder / file).read_text())


def _as_results(anns, shift=0.0, score=1.0):
    """GT annotations fed back as predictions, every joint moved right by ``shift`` pixels."""
    out = []
    for a in anns:
        kp = np.array(a["keypoints"], np.float64).reshape(-1, 3)
        kp[:, 0] += shift
        out.append({"image_id": a["image_id"], "category_id": 1,
                    "keypoints": kp.reshape(-1).tolist(), "score": score})
    return out


def _subset(gt, ann_ids):
    """A GT dict holding only the given annotations and their images."""
    out = copy.deepcopy(gt)
    out["annotations"] = [a for a in out["annotations"] if a["id"] in ann_ids]
    img_ids = {a["image_id"] for a in out["annotations"]}
    out["images"] = [i for i in out["images"] if i["id"] in img_ids]
    return out


def hand_oks(ann, shift, sigmas, s2):
    vis = np.array(ann["keypoints"][2::3]) > 0
    k = 2 * np.array(sigmas)
    return float(np.mean(np.exp(-shift ** 2 / (2 * s2 * k ** 2))[vis]))


@pytest.mark.parametrize("metric", ["coco", "crowdpose"])
def test_gt_as_predictions_scores_100(real_data, metric, tmp_path):
    gt = _gt(real_data, metric)
    res = _as_results([a for a in gt["annotations"] if a["num_keypoints"] > 0])
    out = evaluate_coco(gt, res, metric=metric)
    for key, value in out.items():
        if metric == "crowdpose" and key in ("AP_easy", "AP_hard"):
            assert value is None      # the sample's two images both have 0.2 <= crowdIndex < 0.8
        else:
            assert value == pytest.approx(100.0), key
    path = tmp_path / "res.json"
    path.write_text(json.dumps(res))
    gt_path = real_data / metric / f"test_{metric}.json"
    assert evaluate_file(gt_path, path, metric) == out
    worse = evaluate_coco(gt, _as_results(gt["annotations"], shift=6.0), metric=metric)
    assert worse["AP"] < 100.0 and worse["AR"] < 100.0


def test_coco_single_person_hand_oks(real_data):
    gt = _subset(_gt(real_data, "coco"), {442619})
    ann = gt["annotations"][0]
    oks = hand_oks(ann, 10.0, COCO.sigmas, ann["area"])
    assert oks == pytest.approx(0.82613, abs=1e-4) and np.min(np.abs(THRS - oks)) > 0.02
    out = evaluate_coco(gt, _as_results([ann], shift=10.0))
    assert out["AP"] == pytest.approx(100 * np.mean(oks >= THRS)) == pytest.approx(70.0)
    assert out["AP50"] == out["AP75"] == pytest.approx(100.0)
    assert out["APL"] == pytest.approx(70.0) and out["APM"] is None  # area 27789 > 96^2
    assert out["AR"] == pytest.approx(70.0)


def test_coco_two_persons_precision_interpolation(real_data):
    """Person A exact (score 1), person B moved 10 px (score 0.5). Where B's OKS misses the
    threshold, the ranked list is [TP, FP]: precision 1 up to recall 0.5, so 51 of the 101
    recall points score 1."""
    gt = _subset(_gt(real_data, "coco"), {442619, 198196})
    a, b = (next(x for x in gt["annotations"] if x["id"] == i) for i in (442619, 198196))
    oks_b = hand_oks(b, 10.0, COCO.sigmas, b["area"])
    assert np.min(np.abs(THRS - oks_b)) > 0.02
    res = _as_results([a]) + _as_results([b], shift=10.0, score=0.5)
    out = evaluate_coco(gt, res)
    per_t = np.where(oks_b >= THRS, 1.0, 51 / 101)
    assert out["AP"] == pytest.approx(100 * per_t.mean())
    assert out["AR"] == pytest.approx(100 * np.where(oks_b >= THRS, 1.0, 0.5).mean())


def test_crowdpose_oks_scale_is_053_wh(real_data):
    gt = _subset(_gt(real_data, "crowdpose"), {127068})
    ann = gt["annotations"][0]
    ann["area"] = 1.0           # a GT 'area' must be ignored: CrowdPose uses 0.53 w h
    w, h = ann["bbox"][2:]
    oks = hand_oks(ann, 15.0, CROWDPOSE.sigmas, 0.53 * w * h)
    oks_coco_scale = hand_oks(ann, 15.0, CROWDPOSE.sigmas, w * h)
    assert np.min(np.abs(THRS - oks)) > 0.01
    out = evaluate_coco(gt, _as_results([ann], shift=15.0), metric="crowdpose")
    assert out["AP"] == pytest.approx(100 * np.mean(oks >= THRS)) == pytest.approx(50.0)
    assert 100 * np.mean(oks_coco_scale >= THRS) == pytest.approx(70.0)  # w*h would say 70
    assert out["AP_medium"] == out["AP"] and out["AP_easy"] is None and out["AP_hard"] is None


@pytest.mark.parametrize("wrong,expected", [(19, 5.0), (20, 0.0)])
def test_crowdpose_max_dets_20(real_data, wrong, expected):
    gt = _subset(_gt(real_data, "crowdpose"), {127068})
    ann = gt["annotations"][0]
    junk = [{"image_id": ann["image_id"], "category_id": 1, "keypoints": [1.0, 1.0, 1.0] * 14,
             "score": 0.9}] * wrong
    out = evaluate_coco(gt, junk + _as_results([ann], score=0.1), metric="crowdpose")
    # the true person ranks after `wrong` junk boxes: precision 1/20 at rank 20, cut at rank 21
    assert out["AP"] == pytest.approx(expected)


def test_crowdpose_buckets_see_the_right_images(real_data):
    gt = _gt(real_data, "crowdpose")
    assert {i["id"]: i["crowdIndex"] for i in gt["images"]} == {106848: 0.33, 103319: 0.39}
    assert crowd_index_buckets(gt) == {"easy": [], "medium": [103319, 106848], "hard": []}
    edge = copy.deepcopy(gt)
    edge["images"][0]["crowdIndex"], edge["images"][1]["crowdIndex"] = 0.2, 0.8
    assert crowd_index_buckets(edge) == {"easy": [], "medium": [106848], "hard": [103319]}
    # 106848 easy, 103319 hard; only the hard image's predictions are perturbed
    split = copy.deepcopy(gt)
    split["images"][0]["crowdIndex"], split["images"][1]["crowdIndex"] = 0.1, 0.9
    anns = [a for a in gt["annotations"] if a["num_keypoints"] > 0]
    res = (_as_results([a for a in anns if a["image_id"] == 106848])
           + _as_results([a for a in anns if a["image_id"] == 103319], shift=12.0))
    out = evaluate_coco(split, res, metric="crowdpose")
    hard_only = evaluate_coco(_subset(gt, {127068, 129014}),
                              _as_results([a for a in anns if a["image_id"] == 103319], shift=12.0),
                              metric="crowdpose")
    assert out["AP_easy"] == pytest.approx(100.0) and out["AP_medium"] is None
    assert out["AP_hard"] == pytest.approx(hard_only["AP"]) and out["AP_hard"] < 100.0
    assert out["AP_hard"] < out["AP"] < out["AP_easy"]


def test_coco_metric_with_crowd_buckets(real_data):
    """Synthetic data is scored with COCO's OKS plus the crowd buckets (``crowd_buckets=True``)."""
    gt = _gt(real_data, "crowdpose")
    res = _as_results([a for a in gt["annotations"] if a["num_keypoints"] > 0], shift=4.0)
    out = evaluate_coco(gt, res, metric="coco", crowd_buckets=True)
    assert set(out) == {"AP", "AP50", "AP75", "APM", "APL", "AR", "AP_easy", "AP_medium",
                        "AP_hard"}
    assert out["AP_medium"] == pytest.approx(out["AP"]) and out["AP_easy"] is None
    assert evaluate_coco(gt, [], crowd_buckets=True)["AP_medium"] == 0.0
    with pytest.raises(DataError, match="crowdIndex"):
        evaluate_coco(_gt(real_data, "coco"), [], crowd_buckets=True)


def test_to_coco_results_rescoring():
    coords = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    scores = np.array([[0.9, 0.1, 0.5], [0.1, 0.2, 0.05]])
    res = to_coco_results([7, 8], coords, scores, box_scores=[0.8, 1.0])
    assert res[0]["keypoints"] == pytest.approx([0, 1, 0.9, 2, 3, 0.1, 4, 5, 0.5])
    assert res[0]["score"] == pytest.approx(0.8 * (0.9 + 0.5) / 2)   # joints above 0.2 only
    assert res[1]["score"] == 0.0 and res[1]["image_id"] == 8 and res[1]["category_id"] == 1


def test_empty_results_and_verbose(real_data, capsys):
    gt = _gt(real_data, "coco")
    assert evaluate_coco(gt, []) == {k: 0.0 for k in ("AP", "AP50", "AP75", "APM", "APL", "AR")}
    evaluate_coco(gt, _as_results(gt["annotations"][:1]))
    assert capsys.readouterr().out == ""          # pycocotools' prints are silenced
    evaluate_coco(gt, _as_results(gt["annotations"][:1]), verbose=True)
    assert "Average Precision" in capsys.readouterr().out
