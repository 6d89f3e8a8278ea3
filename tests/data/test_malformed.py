"""Malformed input: copies of the real samples with one field broken each must raise DataError
naming the file, the record and the field, before any training starts."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from kdray.data.coco import DataError, load_coco, load_mpii, read_image
from kdray.eval import evaluate_coco, evaluate_pckh


def _write(tmp_path, data, name="broken.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _expect(call, path, field, record=None, text=None):
    with pytest.raises(DataError) as info:
        call()
    msg = str(info.value)
    assert str(path) in msg, msg
    assert f"field {field!r}" in msg, msg
    if record:
        assert record in msg, msg
    if text:
        assert text in msg, msg


@pytest.fixture
def coco(real_data):
    return json.loads((real_data / "coco" / "test_coco.json").read_text())


def _coco_case(tmp_path, real_data, data):
    path = _write(tmp_path, data)
    return path, lambda: load_coco(path, real_data / "coco")


def test_invalid_json(tmp_path, real_data):
    path = tmp_path / "broken.json"
    path.write_text((real_data / "coco" / "test_coco.json").read_text()[:500])
    _expect(lambda: load_coco(path, real_data / "coco"), path, "(whole file)", text="invalid JSON")


def test_missing_keypoints_field(tmp_path, real_data, coco):
    del coco["annotations"][3]["keypoints"]
    path, call = _coco_case(tmp_path, real_data, coco)
    _expect(call, path, "keypoints", "annotation id 1202706", "missing")


def test_wrong_keypoint_count(tmp_path, real_data, coco):
    coco["annotations"][0]["keypoints"] = coco["annotations"][0]["keypoints"][:-3]
    path, call = _coco_case(tmp_path, real_data, coco)
    _expect(call, path, "keypoints", "annotation id 442619", "expected 51 numbers, got 48")


def test_keypoint_count_matching_no_table(tmp_path, real_data, coco):
    coco["categories"][0]["keypoints"] = coco["categories"][0]["keypoints"][:10]
    path, call = _coco_case(tmp_path, real_data, coco)
    _expect(call, path, "keypoints", "categories", "no keypoint table has 10 joints")


@pytest.mark.parametrize("box", [[10, 10, 0, 50], [10, 10, 40, -5]])
def test_non_positive_box(tmp_path, real_data, coco, box):
    coco["annotations"][1]["bbox"] = box
    path, call = _coco_case(tmp_path, real_data, coco)
    _expect(call, path, "bbox", "annotation id 198196", "must be positive")


def test_nan_keypoint(tmp_path, real_data, coco):
    coco["annotations"][2]["keypoints"][4] = math.nan      # json writes NaN, json.load reads it
    path, call = _coco_case(tmp_path, real_data, coco)
    _expect(call, path, "keypoints", "annotation id 230195", "NaN")


def test_bad_visibility(tmp_path, real_data, coco):
    coco["annotations"][0]["keypoints"][2] = 3
    path, call = _coco_case(tmp_path, real_data, coco)
    _expect(call, path, "keypoints", "annotation id 442619", "visibility of joint 0 is 3")


def test_unknown_image_id_in_annotation(tmp_path, real_data, coco):
    coco["annotations"][0]["image_id"] = 999
    path, call = _coco_case(tmp_path, real_data, coco)
    _expect(call, path, "image_id", "annotation id 442619", "999")


def test_missing_images_list(tmp_path, real_data, coco):
    del coco["images"]
    path, call = _coco_case(tmp_path, real_data, coco)
    _expect(call, path, "images", "top level", "missing")


def test_duplicate_image_id(tmp_path, real_data, coco):
    coco["images"][1]["id"] = coco["images"][0]["id"]
    path, call = _coco_case(tmp_path, real_data, coco)
    _expect(call, path, "id", "image id 785", "duplicate")


def test_missing_image_file(tmp_path, real_data, coco):
    coco["images"][0]["file_name"] = "does_not_exist.jpg"
    path, call = _coco_case(tmp_path, real_data, coco)
    _expect(call, path, "file_name", "image id 785", "does_not_exist.jpg")


def test_unreadable_image(tmp_path, real_data):
    for name in ("000000000785.jpg", "000000040083.jpg", "000000196141.jpg", "000000197388.jpg"):
        shutil.copy(real_data / "coco" / name, tmp_path / name)
    bad = tmp_path / "000000000785.jpg"
    bad.write_bytes(b"not a jpeg at all")
    records, _ = load_coco(real_data / "coco" / "test_coco.json", tmp_path)  # exists: fine here
    target = next(r for r in records if r.image_id == 785)
    _expect(lambda: read_image(target.image_path), bad, "image", text="cannot be decoded")
    _expect(lambda: read_image(tmp_path / "gone.jpg"), tmp_path / "gone.jpg", "image",
            text="does not exist")


def test_detector_unknown_image_id(tmp_path, real_data):
    dets = json.loads((real_data / "coco" / "test_coco_det_AP_H_56.json").read_text())
    dets[5]["image_id"] = 12345
    path = _write(tmp_path, dets, "dets.json")
    _expect(lambda: load_coco(real_data / "coco" / "test_coco.json", real_data / "coco",
                              boxes_file=path), path, "image_id", "detection #5", "12345")


@pytest.mark.parametrize("field,value,text", [("score", None, "missing"),
                                              ("bbox", [1, 2, math.nan, 4], "NaN")])
def test_detector_bad_field(tmp_path, real_data, field, value, text):
    dets = json.loads((real_data / "crowdpose" / "test_crowdpose_det_AP_40.json").read_text())
    if value is None:
        del dets[2][field]
    else:
        dets[2][field] = value
    path = _write(tmp_path, dets, "dets.json")
    _expect(lambda: load_coco(real_data / "crowdpose" / "test_crowdpose.json",
                              real_data / "crowdpose", boxes_file=path),
            path, field, "detection #2", text)


@pytest.fixture
def mpii(real_data):
    return json.loads((real_data / "mpii" / "test_mpii.json").read_text())


@pytest.mark.parametrize("field,mutate,text", [
    ("joints", lambda p: p["joints"].pop(), "expected 16"),
    ("joints_vis", lambda p: p["joints_vis"].__setitem__(3, 2), "0 or 1"),
    ("scale", lambda p: p.__setitem__("scale", 0.0), "must be positive"),
    ("center", lambda p: p.pop("center"), "missing"),
    ("image", lambda p: p.__setitem__("image", "missing_001.jpg"), "does not exist"),
])
def test_mpii_broken_field(tmp_path, real_data, mpii, field, mutate, text):
    mutate(mpii[4])
    path = _write(tmp_path, mpii)
    _expect(lambda: load_mpii(path, real_data / "mpii"), path, field, "person #4", text)


def test_results_with_unknown_image_id(tmp_path, real_data):
    gt = real_data / "coco" / "test_coco.json"
    res = [{"image_id": 1, "category_id": 1, "keypoints": [0.0] * 51, "score": 1.0}]
    path = _write(tmp_path, res, "results.json")
    _expect(lambda: evaluate_coco(gt, path), path, "image_id", "result #0", "not in the GT")


def test_pckh_predictions_wrong_shape(tmp_path, real_data, mpii):
    preds = [{"joints": p["joints"][:15]} for p in mpii]
    path = _write(tmp_path, preds, "preds.json")
    _expect(lambda: evaluate_pckh(real_data / "mpii" / "test_mpii.json", path), path, "joints",
            "prediction #0", "expected 16 x 2")
    short = _write(tmp_path, [p["joints"] for p in mpii[:4]], "short.json")
    _expect(lambda: evaluate_pckh(mpii, short), short, "joints", text="4 predictions for 5")
    assert np.isfinite(evaluate_pckh(mpii, [p["joints"] for p in mpii])["Mean"])
