"""``kdray predict`` on a real COCO image with the real detector file: score threshold, NMS,
boxes drawn, COCO-format keypoints (--json); the whole image when no box is given."""
from __future__ import annotations

import json

import cv2
import numpy as np

from kdray.cli import main as kdray
from kdray.eval.coco import evaluate_coco
from kdray.predict import BOX_BGR

IMAGE = "000000197388.jpg"
# The detector's boxes of this image scoring >= 0.3 (10), less the five that overlap a better
# one by IoU > 0.5 (hand-computed: e.g. [280,60,82,147] vs [282,59,82,86]: 6800 / 12306 = 0.55).
KEPT = [[377, 173, 261, 216], [164, 80, 200, 259], [1, 47, 91, 221], [542, 51, 98, 187],
        [282, 59, 82, 86]]


def test_detector_boxes_threshold_nms_draw_and_json(real_data, tiny_checkpoint, tmp_path,
                                                    capsys):
    coco = real_data / "coco"
    out, js = tmp_path / "pose.png", tmp_path / "kp" / "keypoints.json"
    assert kdray(["predict", "--model", str(tiny_checkpoint), str(coco / IMAGE), "--boxes",
                  str(coco / "test_coco_det_AP_H_56.json"), "--score-thr", "0.3",
                  "--nms-iou", "0.5", "--out", str(out), "--json", str(js)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert "10 person boxes >= 0.3, 5 after NMS (IoU 0.5)" in captured.err
    results = json.loads(js.read_text())
    assert printed["persons"] == len(results) == 5
    assert [[round(v) for v in r["bbox"]] for r in results] == KEPT
    assert all(r["image_id"] == 197388 and len(r["keypoints"]) == 51 for r in results)
    kp = np.asarray(results[0]["keypoints"]).reshape(17, 3)
    np.testing.assert_allclose(kp, printed["keypoints"][0], atol=0.006)   # printed to 2 decimals
    # the results file is what pycocotools scores (COCO keypoint results format)
    gt = json.loads((coco / "test_coco.json").read_text())
    gt["images"] = [im for im in gt["images"] if im["id"] == 197388]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] == 197388]
    assert 0.0 <= evaluate_coco(gt, results)["AP"] <= 100.0
    # each kept box is drawn on top: its top edge is the box colour
    img = cv2.imread(str(out))
    for x, y, w, _ in KEPT:
        np.testing.assert_array_equal(img[y, x + 2:x + w - 2], [BOX_BGR] * (w - 4))


def test_without_boxes_the_whole_image_is_one_person(real_data, tiny_checkpoint, tmp_path,
                                                      capsys):
    assert kdray(["predict", "--model", str(tiny_checkpoint), str(real_data / "coco" / IMAGE),
                  "--out", str(tmp_path / "pose.png")]) == 0
    captured = capsys.readouterr()
    assert "no --boxes: the whole image is treated as one person box" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["persons"] == 1
