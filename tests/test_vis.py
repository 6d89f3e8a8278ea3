"""kdray.vis: pose drawing styles, sheets, the SynthPose preview."""
from __future__ import annotations

import cv2
import numpy as np

from kdray.data.keypoints import COCO
from kdray.data.synthpose import generate
from kdray.vis import LEFT, RIGHT, crop_person, draw_pose, make_sheet, preview_sheet


def _pose(v_left: int = 2, v_right: int = 2, joints=(9, 10)) -> np.ndarray:
    """Two joints (default the wrists, which share no limb) at (20, 30) and (60, 30)."""
    kp = np.zeros((17, 3), np.float32)
    kp[joints[0]] = (20, 30, v_left)
    kp[joints[1]] = (60, 30, v_right)
    return kp


def test_visible_filled_occluded_hollow_unlabelled_absent():
    img = np.zeros((64, 80, 3), np.uint8)
    out = draw_pose(img, _pose(2, 1), radius=6, thickness=1)
    assert (img == 0).all()                                   # copy by default
    assert tuple(out[30, 20]) == LEFT                         # filled centre, left colour
    assert tuple(out[30, 60]) == (0, 0, 0)                    # hollow centre ...
    ring = out[30, 52:69].astype(int)                         # ... with a right-coloured ring
    assert ring[:, 0].max() > 150 and ring[:, 2].max() < 40
    none = draw_pose(img, _pose(0, 0))
    assert (none == 0).all()
    plain = draw_pose(img, _pose(2, 1), radius=6, visible_style=False)
    assert tuple(plain[30, 60]) == RIGHT


def test_scores_and_spec_argument():
    img = np.zeros((64, 80, 3), np.uint8)
    xy = _pose()[:, :2]
    scores = np.zeros(17)
    scores[9] = 0.9                                           # only the left wrist passes
    out = draw_pose(img, xy, scores=scores, radius=4)
    assert tuple(out[30, 20]) == LEFT and (out[25:36, 55:66] == 0).all()
    out2 = draw_pose(img, _pose(joints=(5, 6)), COCO, radius=4)   # a spec as 3rd argument
    assert tuple(out2[30, 60]) == RIGHT
    assert (out2[30, 30:50] != 0).any(axis=1).all()           # the shoulder-shoulder limb


def test_make_sheet_size():
    ims = [np.full((10, 8, 3), i, np.uint8) for i in range(5)]
    sheet = make_sheet(ims, ncols=2, pad=1)
    assert sheet.shape == (3 * 11 + 1, 2 * 9 + 1, 3)
    assert (sheet[1:11, 10:18] == 1).all()                   # row-major placement


def test_crop_person_maps_box_centre_to_crop_centre():
    img = np.zeros((100, 120, 3), np.uint8)
    crop, M = crop_person(img, (40, 20, 30, 60), (64, 48))
    assert crop.shape == (64, 48, 3)
    np.testing.assert_allclose(M @ [55, 50, 1], [24, 32])


def test_preview_sheet_png(tmp_path):
    generate(tmp_path / "d", train=6, val=4, seed=0, workers=1, progress=False)
    out = preview_sheet(tmp_path / "d" / "train.json", tmp_path / "d" / "images",
                        tmp_path / "p" / "sheet.png", n=5, crop_hw=(128, 96), ncols=3)
    sheet = cv2.imread(str(out))
    assert out.suffix == ".png" and sheet.shape == (2 * 130 + 2, 3 * 98 + 2, 3)
    cells = [sheet[2 + r * 130:(r + 1) * 130, 2 + c * 98:(c + 1) * 98]
             for r in range(2) for c in range(3)]
    assert (cells[5] == 40).all()                             # 5 crops: the sixth cell is empty
    for cell in cells[:5]:                                    # each crop carries its skeleton
        assert any((cell == colour).all(axis=-1).any() for colour in (LEFT, RIGHT))
