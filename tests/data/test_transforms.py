"""Affine crops, flip, half-body and the back-transform (kdray/data/transforms.py)."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import torch

from kdray.config import DataConfig
from kdray.data.keypoints import COCO
from kdray.data.transforms import (CropParams, back_to_image, box_to_center_scale, get_affine,
                                   half_body, sample_crop, transform_points, warp)

SIZE = (64, 48)  # (H, W)


def test_box_to_center_scale_fixes_aspect_then_pads():
    c, s = box_to_center_scale([10, 20, 30, 100], aspect_wh=0.75, padding=1.25)
    np.testing.assert_allclose(c, [25, 70])
    np.testing.assert_allclose(s, [75 * 1.25, 100 * 1.25])     # width grown to 0.75 * 100
    _, s = box_to_center_scale([0, 0, 90, 60], aspect_wh=0.75, padding=1.0)
    np.testing.assert_allclose(s, [90, 120])                    # height grown to 90 / 0.75


def _mmpose_warp_matrix(center, scale, rot, out_wh):
    """mmpose's get_warp_matrix (3-point construction), the reference convention."""
    t = np.deg2rad(rot)
    rotate = lambda p: np.array([p[0] * np.cos(t) - p[1] * np.sin(t),  # noqa: E731
                                 p[0] * np.sin(t) + p[1] * np.cos(t)])
    src_dir = rotate(np.array([0.0, scale[0] * -0.5]))
    dst_dir = np.array([0.0, out_wh[0] * -0.5])
    src = np.stack([center, center + src_dir, np.zeros(2)])
    dst = np.stack([np.array(out_wh) * 0.5, np.array(out_wh) * 0.5 + dst_dir, np.zeros(2)])
    third = lambda a, b: b + np.array([-(a - b)[1], (a - b)[0]])  # noqa: E731
    src[2], dst[2] = third(src[0], src[1]), third(dst[0], dst[1])
    return cv2.getAffineTransform(src.astype(np.float32), dst.astype(np.float32))


def test_get_affine_matches_mmpose_convention():
    c, s = np.array([100.0, 80.0]), np.array([60.0, 80.0])
    for rot in (0.0, 30.0, -75.0):
        ref = _mmpose_warp_matrix(c, s, rot, (48, 64))
        np.testing.assert_allclose(get_affine(c, s, rot, SIZE), ref, atol=1e-4)
    m = get_affine(c, s, 0.0, SIZE)
    np.testing.assert_allclose(transform_points(c, m), [24, 32])           # centre -> (W/2, H/2)
    # Positive rotation turns content counter-clockwise: 'up' in the image goes up-left.
    up = transform_points(c + [0, -10], get_affine(c, s, 30.0, SIZE)) - [24, 32]
    assert up[0] < 0 and up[1] < 0


def test_affine_inverse_round_trip():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 600, (50, 2))
    c, s = np.array([320.5, 211.25]), np.array([187.0, 249.3])
    for rot, flip in ((0.0, False), (33.0, True), (-170.0, False)):
        m = get_affine(c, s, rot, SIZE, flip=flip)
        minv = get_affine(c, s, rot, SIZE, inverse=True, flip=flip)
        back = transform_points(transform_points(pts, m).astype(np.float64), minv)
        assert np.abs(back - pts).max() < 1e-3
    # back_to_image (rotation 0, batch) on numpy and torch
    crop = transform_points(pts, get_affine(c, s, 0.0, SIZE))[None]
    img = back_to_image(crop, c[None], s[None], SIZE)
    assert np.abs(img[0] - pts).max() < 1e-3
    img_t = back_to_image(torch.from_numpy(crop).double(), torch.tensor(c)[None],
                          torch.tensor(s)[None], SIZE)
    assert (img_t[0] - torch.from_numpy(pts)).abs().max().item() < 1e-3


def test_flip_swaps_joints_through_flip_pairs():
    """Asymmetric pose: left wrist up, right wrist down. After the flip the 'left wrist' row
    holds the mirrored right wrist, and the image content agrees with the rows."""
    kp = np.zeros((17, 2), np.float32)
    kp[:, 0], kp[:, 1] = 100.0, 100.0
    lw, rw = COCO.joints.index("left_wrist"), COCO.joints.index("right_wrist")
    kp[lw] = (130.0, 60.0)    # left wrist up (image left/right as drawn)
    kp[rw] = (80.0, 150.0)    # right wrist down
    c, s = box_to_center_scale([60, 40, 80, 120], 48 / 64, 1.25)
    plain = transform_points(kp, get_affine(c, s, 0.0, SIZE))
    flipped = transform_points(kp, get_affine(c, s, 0.0, SIZE, flip=True))[COCO.flip_index()]
    np.testing.assert_allclose(flipped[lw], [48 - plain[rw, 0], plain[rw, 1]], atol=1e-4)
    np.testing.assert_allclose(flipped[rw], [48 - plain[lw, 0], plain[lw, 1]], atol=1e-4)
    assert flipped[lw, 1] > flipped[rw, 1]     # the 'left wrist' row is now the lower one
    # Image: a bright dot at the right wrist lands where the flipped left-wrist row says.
    image = np.zeros((240, 240, 3), np.uint8)
    cv2.circle(image, (80, 150), 6, (255, 255, 255), -1)
    crop = warp(image, get_affine(c, s, 0.0, SIZE, flip=True), SIZE)[..., 0].astype(float)
    ys, xs = np.mgrid[:64, :48]
    centroid = [(crop * xs).sum() / crop.sum(), (crop * ys).sum() / crop.sum()]
    np.testing.assert_allclose(centroid, flipped[lw], atol=0.1)


def test_flipped_crop_is_the_mirrored_crop():
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8), (5, 5), 2)
    c, s = np.array([150.0, 100.0]), np.array([96.0, 128.0])
    a = warp(image, get_affine(c, s, 0.0, SIZE), SIZE).astype(int)
    b = warp(image, get_affine(c, s, 0.0, SIZE, flip=True), SIZE).astype(int)
    assert a.dtype == b.dtype and b.shape == (64, 48, 3)
    # x -> W - x: column i of the flipped crop is column W - i of the plain one.
    assert np.abs(b[:, 1:] - a[:, ::-1][:, :-1]).max() <= 1


def test_half_body_box_covers_the_chosen_half():
    kp = np.zeros((17, 3), np.float32)
    kp[:, 2] = 2
    kp[:11, :2] = np.column_stack([np.linspace(40, 60, 11), np.linspace(10, 50, 11)])
    kp[11:, :2] = np.column_stack([np.linspace(40, 60, 6), np.linspace(60, 140, 6)])
    seen = set()
    for seed in range(20):
        c, s = half_body(kp, COCO, 0.75, np.random.default_rng(seed))
        seen.add(bool(c[1] < 55))
        np.testing.assert_allclose(s[0] / s[1], 0.75, rtol=1e-5)
    assert seen == {True, False}             # both halves get picked
    kp[3:, 2] = 0                            # too few labelled joints -> no half-body box
    assert half_body(kp, COCO, 0.75, np.random.default_rng(0)) is None


def test_sample_crop_is_deterministic_per_seed_and_plain_without_rng():
    cfg = DataConfig()
    kp = np.zeros((17, 3), np.float32)
    box = [10, 20, 50, 90]
    a = sample_crop(box, kp, COCO, cfg, 0.75, np.random.default_rng(7))
    b = sample_crop(box, kp, COCO, cfg, 0.75, np.random.default_rng(7))
    for fa, fb in zip(dataclasses.astuple(a), dataclasses.astuple(b)):
        np.testing.assert_array_equal(fa, fb)
    plain = sample_crop(box, kp, COCO, cfg, 0.75, None)
    c, s = box_to_center_scale(box, 0.75, cfg.padding)
    assert plain.rotation == 0.0 and not plain.flip
    np.testing.assert_array_equal(plain.center, c)
    np.testing.assert_array_equal(plain.scale, s)
    rots = [sample_crop(box, kp, COCO, cfg, 0.75, np.random.default_rng(i)).rotation
            for i in range(200)]
    assert max(abs(r) for r in rots) <= cfg.rotation
    assert 0.3 < np.mean([r != 0 for r in rots]) < 0.9      # rotation_prob = 0.6


def test_crop_params_affine_is_get_affine():
    p = CropParams(np.array([5.0, 6.0]), np.array([30.0, 40.0]), 12.0, True)
    np.testing.assert_array_equal(p.affine(SIZE), get_affine(p.center, p.scale, 12.0, SIZE,
                                                             flip=True))
