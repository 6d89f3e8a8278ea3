"""Readers on the real samples (shared/data/real): COCO, CrowdPose, MPII, detector boxes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kdray.config import DataConfig
from kdray.data.coco import DataError, PersonRecord, load_coco, load_dataset, load_mpii, read_image
from kdray.data.keypoints import COCO, CROWDPOSE, MPII


def _check_record(r: PersonRecord, k: int) -> None:
    assert r.bbox.shape == (4,) and r.bbox.dtype == np.float32
    assert r.keypoints.shape == (k, 3) and r.keypoints.dtype == np.float32
    assert r.bbox[2] > 0 and r.bbox[3] > 0
    assert set(np.unique(r.keypoints[:, 2])) <= {0.0, 1.0, 2.0}
    assert isinstance(r.image_id, int) and isinstance(r.ann_id, int)


def test_coco_gt_boxes(real_data):
    ann = real_data / "coco" / "test_coco.json"
    records, spec = load_coco(ann, real_data / "coco")
    assert spec is COCO
    raw = {a["id"]: a for a in json.loads(ann.read_text())["annotations"]}
    # 14 annotations, two with num_keypoints == 0 are skipped
    assert len(records) == 12
    assert {r.ann_id for r in records} == {i for i, a in raw.items() if a["num_keypoints"] > 0}
    for r in records:
        _check_record(r, 17)
        a = raw[r.ann_id]
        np.testing.assert_allclose(r.bbox, a["bbox"], rtol=1e-6)
        np.testing.assert_array_equal(r.keypoints.reshape(-1), np.float32(a["keypoints"]))
        assert r.image_id == a["image_id"] and r.area == pytest.approx(a["area"])
        assert r.score == 1.0 and r.image_path.endswith(f"{a['image_id']:012d}.jpg")


def test_coco_detector_boxes_and_threshold(real_data):
    ann = real_data / "coco" / "test_coco.json"
    det = real_data / "coco" / "test_coco_det_AP_H_56.json"
    dets = json.loads(det.read_text())
    records, spec = load_coco(ann, real_data / "coco", boxes_file=det)
    assert spec is COCO and len(records) == len(dets) == 118
    assert all(not r.keypoints.any() for r in records)
    assert [r.ann_id for r in records] == [-1 - i for i in range(118)]   # negative: no GT person
    assert [r.score for r in records] == pytest.approx([d["score"] for d in dets])
    kept, _ = load_coco(ann, real_data / "coco", boxes_file=det, score_thr=0.5)
    assert len(kept) == sum(d["score"] >= 0.5 for d in dets) < 118
    assert all(r.score >= 0.5 for r in kept)


def test_crowdpose_gt_and_detector(real_data):
    ann = real_data / "crowdpose" / "test_crowdpose.json"
    records, spec = load_coco(ann, real_data / "crowdpose")
    assert spec is CROWDPOSE and len(records) == 4        # 5 annotations, one with 0 keypoints
    for r in records:
        _check_record(r, 14)
        # the CrowdPose file has no 'area' field: w * h stands in
        assert r.area == pytest.approx(float(r.bbox[2]) * float(r.bbox[3]), rel=1e-5)
    dets, _ = load_coco(ann, real_data / "crowdpose",
                        boxes_file=real_data / "crowdpose" / "test_crowdpose_det_AP_40.json")
    assert len(dets) == 6 and {r.image_id for r in dets} == {103319, 106848}


def test_mpii_boxes_and_visibility(real_data):
    ann = real_data / "mpii" / "test_mpii.json"
    raw = json.loads(ann.read_text())
    records, spec = load_mpii(ann, real_data / "mpii")
    assert spec is MPII and len(records) == 5
    for i, (r, p) in enumerate(zip(records, raw)):
        _check_record(r, 16)
        assert r.ann_id == i and r.image_id == int(p["image"].split(".")[0])
        side = p["scale"] * 200
        # square box of side scale*200 around the toolbox-adjusted centre (y + 15*scale, -1 px)
        cx, cy = p["center"][0] - 1, p["center"][1] + 15 * p["scale"] - 1
        np.testing.assert_allclose(r.bbox, [cx - side / 2, cy - side / 2, side, side], rtol=1e-5)
        np.testing.assert_allclose(r.center, [cx, cy], rtol=1e-6)
        np.testing.assert_allclose(r.keypoints[:, :2], p["joints"], rtol=1e-6)
        np.testing.assert_array_equal(r.keypoints[:, 2], 2 * np.array(p["joints_vis"]))
    assert records[2].keypoints[0, 2] == 0     # joints_vis 0 -> v 0


def test_check_images_off_allows_missing_image_dir(real_data, tmp_path):
    records, _ = load_coco(real_data / "coco" / "test_coco.json", tmp_path / "nowhere",
                           check_images=False)
    assert len(records) == 12
    with pytest.raises(DataError, match="file_name"):
        load_coco(real_data / "coco" / "test_coco.json", tmp_path / "nowhere")


def test_read_image(real_data):
    img = read_image(real_data / "coco" / "000000000785.jpg")
    assert img.dtype == np.uint8 and img.shape == (425, 640, 3)


@pytest.mark.parametrize("name,folder,ann,boxes,n_val", [
    ("coco", "coco", "test_coco.json", "test_coco_det_AP_H_56.json", 118),
    ("crowdpose", "crowdpose", "test_crowdpose.json", "test_crowdpose_det_AP_40.json", 6),
    ("mpii", "mpii", "test_mpii.json", "", 5),
])
def test_load_dataset(real_data, name, folder, ann, boxes, n_val):
    cfg = DataConfig(dataset=name, root=str(real_data / folder), train_ann=ann, val_ann=ann,
                     image_dir=".", val_boxes=boxes)
    train, spec = load_dataset(cfg, "train")
    val, _ = load_dataset(cfg, "val")
    assert spec.name == name and len(val) == n_val
    assert all(r.keypoints[:, 2].any() for r in train)
    with pytest.raises(ValueError):
        load_dataset(cfg, "test")


def test_load_dataset_rejects_keypoint_count_mismatch(real_data):
    cfg = DataConfig(dataset="coco", root=str(real_data / "crowdpose"),
                     train_ann="test_crowdpose.json", image_dir=".")
    with pytest.raises(DataError, match="expects 17 keypoints"):
        load_dataset(cfg, "train")


def test_per_split_image_folders(real_data, tmp_path):
    """COCO as it ships: annotations/ beside train2017/ and val2017/; each split reads its own
    folder (data.train_images / data.val_images), data.image_dir only where they are empty."""
    data = json.loads((real_data / "coco" / "test_coco.json").read_text())
    ids = sorted(im["id"] for im in data["images"])
    split = {"train2017": ids[:2], "val2017": ids[2:]}
    (tmp_path / "annotations").mkdir()
    for folder, keep in split.items():
        (tmp_path / folder).mkdir()
        part = {**data, "images": [im for im in data["images"] if im["id"] in keep],
                "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
        for im in part["images"]:
            (tmp_path / folder / im["file_name"]).symlink_to(real_data / "coco" / im["file_name"])
        name = "person_keypoints_" + folder + ".json"
        (tmp_path / "annotations" / name).write_text(json.dumps(part))
    cfg = DataConfig(dataset="coco", root=str(tmp_path),
                     train_ann="annotations/person_keypoints_train2017.json",
                     val_ann="annotations/person_keypoints_val2017.json",
                     train_images="train2017", val_images="val2017")
    for s, folder in (("train", "train2017"), ("val", "val2017")):
        records, _ = load_dataset(cfg, s)
        assert {r.image_id for r in records} <= set(split[folder]) and records
        assert {r.image_path.rsplit("/", 2)[-2] for r in records} == {folder}
    # one folder for both splits (the old layout): the val images are not in train2017
    with pytest.raises(DataError, match="val2017.json"):
        load_dataset(DataConfig(dataset="coco", root=str(tmp_path), image_dir="train2017",
                                val_ann="annotations/person_keypoints_val2017.json"), "val")
