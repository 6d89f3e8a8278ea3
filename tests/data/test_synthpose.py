"""SynthPose: determinism, COCO validity, CrowdPose crowd index, geometric left/right."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO as CocoApi

from kdray.data.keypoints import COCO
from kdray.data.synth_figure import PART, Figure, draw, keypoints, sample_figure
from kdray.data.coco import DataError
from kdray.data.synthpose import (OCCLUDER, Difficulty, _visibility, check_generated,
                                  crowd_index, dataset_stats, generate, person_counts)

TRAIN, VAL = 40, 20


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate(out, train=TRAIN, val=VAL, seed=0, workers=1, progress=False)
    return out


def test_same_seed_identical_bytes_any_worker_count(synth, tmp_path):
    info = generate(tmp_path / "b", train=TRAIN, val=VAL, seed=0, workers=2, progress=False)
    assert _files(synth) == _files(tmp_path / "b")
    assert info["train_persons"] == TRAIN and info["val_persons"] == VAL
    assert {"train", "val", "val_dets", "images"} <= set(info)


def test_other_seed_differs(synth, tmp_path):
    generate(tmp_path / "c", train=TRAIN, val=VAL, seed=1, workers=1, progress=False)
    a, c = _files(synth), _files(tmp_path / "c")
    assert a["train.json"] != c["train.json"]
    assert a["images/train_000000.jpg"] != c["images/train_000000.jpg"]


def test_person_counts_sum_exactly():
    for total in (1, 7, 40, 4000):
        counts = person_counts(total, 0, 0)
        assert sum(counts) == total and set(counts) <= {1, 2, 3, 4}


def test_default_difficulty_is_recorded_and_checked(synth):
    info = json.loads((synth / "train.json").read_text())["info"]
    assert info == {"description": "SynthPose train", "seed": 0, "persons": TRAIN,
                    "max_persons": 4, "crowd_p": .4, "occluder_p": .15, "side_p": .25,
                    "back_p": .25}
    check_generated(synth, TRAIN, VAL, 0)                       # same settings: no error
    for args, field in (((TRAIN + 1, VAL, 0), "persons"), ((TRAIN, VAL, 1), "seed"),
                        ((TRAIN, VAL, 0, Difficulty(occluder_p=0.0)), "occluder_p")):
        with pytest.raises(DataError, match=rf"train.json: info: field '{field}'.*data.synth"):
            check_generated(synth, *args)


def test_easier_difficulty(synth, tmp_path):
    """max_persons=1, no occluders, no side views: one person per image, and every hidden
    joint is hidden by the person's own body (fewer than in the full set)."""
    out = tmp_path / "easy"
    generate(out, train=TRAIN, val=VAL, seed=0, workers=1, progress=False,
             hard=Difficulty(max_persons=1, crowd_p=0.0, occluder_p=0.0, side_p=0.0))
    d = json.loads((out / "train.json").read_text())
    assert len(d["images"]) == len(d["annotations"]) == TRAIN
    assert all(im["crowdIndex"] == 0.0 for im in d["images"])
    hidden = [dataset_stats(root)["train"]["keypoints"]["occluded_of_labelled"]
              for root in (out, synth)]
    assert hidden[0] < hidden[1]


def test_ensure_data_refuses_other_settings(tmp_path):
    """A config whose data.synth differs from the folder's: a clear error, files untouched."""
    from kdray.config import load_config
    from kdray.stage_run import ensure_data
    cfg = load_config(None, [f"data.root={tmp_path}", "data.synth.train=12", "data.synth.val=6"])
    ensure_data(cfg)                                            # generates
    before = _files(tmp_path)
    ensure_data(cfg)                                            # same settings: reused
    bad = load_config(None, [f"data.root={tmp_path}", "data.synth.train=12",
                             "data.synth.val=6", "data.synth.max_persons=2"])
    with pytest.raises(DataError, match="max_persons.*generated with 4.*asks for 2"):
        ensure_data(bad)
    assert _files(tmp_path) == before


def test_coco_validity(synth):
    for split, n in (("train", TRAIN), ("val", VAL)):
        api = CocoApi(str(synth / f"{split}.json"))
        anns = api.loadAnns(api.getAnnIds())
        assert len(anns) == n
        cat = api.loadCats(1)[0]
        assert cat["keypoints"] == list(COCO.joints)
        assert cat["skeleton"] == [[a + 1, b + 1] for a, b in COCO.skeleton]
        for a in anns:
            kp = np.array(a["keypoints"], float).reshape(17, 3)
            assert set(kp[:, 2]) <= {0, 1, 2}
            assert a["num_keypoints"] == int((kp[:, 2] > 0).sum()) >= 8
            assert (kp[kp[:, 2] == 0] == 0).all()
            x, y, w, h = a["bbox"]
            img = api.loadImgs(a["image_id"])[0]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
            assert 0 < a["area"] <= w * h and a["iscrowd"] == 0 and a["category_id"] == 1
        for img in api.loadImgs(api.getImgIds()):
            assert 0.0 <= img["crowdIndex"] <= 1.0
            pix = cv2.imread(str(synth / "images" / img["file_name"]))
            assert pix.shape == (img["height"], img["width"], 3)
    d = json.loads((synth / "train.json").read_text())
    v = np.array([a["keypoints"][2::3] for a in d["annotations"]])
    assert (v == 1).any() and (v == 2).mean() > 0.5           # some occluded, mostly visible
    per_image = np.bincount([a["image_id"] for a in d["annotations"]])
    assert per_image.max() >= 2                               # several persons per image


def test_detections_file(synth):
    gt = CocoApi(str(synth / "val.json"))
    dets = json.loads((synth / "val_dets.json").read_text())
    res = gt.loadRes(dets)                                    # COCO results format
    assert len(res.getAnnIds()) >= VAL
    assert {d["image_id"] for d in dets} == set(gt.getImgIds())
    assert all(0 < d["score"] <= 1 and d["bbox"][2] > 0 and d["bbox"][3] > 0 for d in dets)


def test_stats(synth):
    st = dataset_stats(synth)
    for split, n in (("train", TRAIN), ("val", VAL)):
        s = st[split]
        assert s["persons"] == n
        ci = s["crowd_index"]
        assert ci["easy_lt_0.2"] + ci["medium_lt_0.8"] + ci["hard_ge_0.8"] == s["images"]
        k = s["keypoints"]
        assert abs(k["visible_v2"] + k["occluded_v1"] + k["unlabelled_v0"] - 1) < 1e-2


def test_crowd_index_golden():
    """N_b / N_a per person: A (3 labelled) has 2 of B's keypoints in its box -> 2/3; B's box
    holds none of A's -> 0; the image's index is the mean, 1/3."""
    a = np.array([[1, 1, 2], [2, 2, 2], [3, 1, 1], [0, 0, 0]], float)
    b = np.array([[3, 3, 2], [4, 4, 1], [20, 20, 2], [30, 30, 2]], float)
    boxes = [np.array([0, 0, 5, 5]), np.array([15, 15, 20, 20])]           # xywh
    assert crowd_index(boxes, [a, b]) == pytest.approx(1 / 3)
    assert crowd_index([np.array([0, 0, 50, 50])] * 2, [b, b]) == 1.0       # clipped to 1


def _render(f: Figure, H: int = 200, W: int = 160):
    img, lab = np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.uint8)
    draw(f, img, lab)
    return img, lab


@pytest.mark.parametrize("seed", range(6))
def test_mirrored_figure_is_the_mirror_image(seed):
    """Left/right is geometric: the mirror image of a figure, with left/right labels swapped by
    the flip pairs, is exactly the figure generated with mirrored parameters."""
    f = sample_figure(np.random.default_rng(seed), 77.3, 100.6, 140.0)
    m = f.mirrored(160)
    (img, _), (img_m, _) = _render(f), _render(m)
    (kp, front), (kp_m, front_m) = keypoints(f), keypoints(m)
    flipped = kp[COCO.flip_index()].copy()
    flipped[:, 0] = 159 - flipped[:, 0]
    np.testing.assert_allclose(kp_m, flipped, atol=1e-3)
    assert (front_m == front[COCO.flip_index()]).all()
    diff = np.abs(img[:, ::-1].astype(int) - img_m).max(2)
    assert (diff > 40).mean() < 0.002                         # only anti-aliasing differs


def test_face_direction_cues():
    """Facing the camera the person's left shoulder is on the image right and the face is seen;
    in profile the nose points the way the person faces; from behind the face is unlabelled."""
    f = sample_figure(np.random.default_rng(0), 80, 100, 150)
    neutral = dict(roll=0.0, spine=(0.0, 0.0, 0.0), head=(0.0, 0.0))
    kp, front = keypoints(replace(f, **neutral, yaw=0.0))
    assert kp[5, 0] > kp[6, 0] and kp[11, 0] > kp[12, 0] and front[:5].all()
    kp, front = keypoints(replace(f, **neutral, yaw=np.pi))
    assert kp[5, 0] < kp[6, 0] and not front[:3].any()
    for yaw, sign in ((np.pi / 2, 1), (-np.pi / 2, -1)):       # facing image right / left
        kp, _ = keypoints(replace(f, **neutral, yaw=yaw))
        assert sign * (kp[0, 0] - kp[3:5, 0].mean()) > 0.03 * f.height


def test_visibility_from_labels():
    f = sample_figure(np.random.default_rng(1), 80, 100, 150)
    f = replace(f, yaw=0.0, head=(0.0, 0.0))
    _, lab = _render(f)
    kp, front = keypoints(f)
    v = _visibility(lab, 0, kp, front)
    wrist = kp[9].astype(int)
    lab[wrist[1] - 3:wrist[1] + 4, wrist[0] - 3:wrist[0] + 4] = OCCLUDER   # an object on it
    v2 = _visibility(lab, 0, kp, front)
    assert v2[9] == 1 and v[0] == 2                           # hidden wrist, visible nose
    far = kp.copy()
    far[16] = (-5, 10)                                        # outside the image -> 0
    assert _visibility(lab, 0, far, front)[16] == 0
    assert lab[int(kp[0, 1]), int(kp[0, 0])] == PART["head"] + 1
