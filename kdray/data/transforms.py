"""Top-down affine crops and their augmentation (docs/methods.md 1.1), hi/low-res views (CDKD).

Coordinates are OpenCV's: pixel i has its centre at i, in the image and in the crop. A crop is
one affine map M (2, 3) from image to crop pixels, composed from (center, scale, rotation, flip);
the image is warped with M and the keypoints are mapped with the *same* M, so image and labels
agree whatever M is, and ``back_to_image`` (the inverse) is exact.

Convention (mmpose's ``get_warp_matrix``): the box centre goes to ``(W / 2, H / 2)`` and the
box size ``scale = (w, h)`` to the crop size. Hence two crops of the same box at sizes S1 and S2
relate by plain scaling, ``x2 = x1 * S2 / S1`` (CDKD compares the two views bin by bin).

Flip mirrors the image about the box's vertical axis, ``x -> 2 cx - x``, composed into M: for an
unrotated crop that is ``x_crop -> W - x_crop``. Because the mirror acts in image space, the
high- and low-resolution views of one crop still satisfy ``x_low = x_high * low / high`` when
flipped (a crop-space mirror ``x -> W - 1 - x`` would break that by ``(m - 1) / m`` px). The joints
then swap rows through the dataset's flip pairs. (Test-time flip is a different operation: the
evaluator reverses the crop tensor, ``x -> W - 1 - x``, and undoes it with
``SimCCCodec.flip_logits``.)
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from kdray.data.keypoints import KeypointSpec

__all__ = ["CropParams", "back_to_image", "box_to_center_scale", "get_affine", "half_body",
           "sample_crop", "transform_points", "warp"]


@dataclass(frozen=True)
class CropParams:
    """Everything that defines one crop; shared by the high- and low-resolution views."""
    center: np.ndarray          # (2,) image pixels
    scale: np.ndarray           # (2,) box (w, h) in image pixels, padded and aspect-fixed
    rotation: float = 0.0       # degrees, counter-clockwise as seen in the crop
    flip: bool = False

    def affine(self, out_size_hw: tuple[int, int], inverse: bool = False) -> np.ndarray:
        return get_affine(self.center, self.scale, self.rotation, out_size_hw, inverse,
                          flip=self.flip)


def box_to_center_scale(bbox_xywh, aspect_wh: float, padding: float = 1.25
                        ) -> tuple[np.ndarray, np.ndarray]:
    """COCO box (4,) xywh -> center (2,), scale (2,) = padded (w, h) with ``w / h = aspect_wh``.

    The shorter side is grown to the input aspect ratio (W / H of the crop) so the warp never
    distorts the person, then both are multiplied by ``padding`` (1.25, docs/methods.md 1.1).
    """
    x, y, w, h = (float(v) for v in bbox_xywh)
    center = np.array([x + 0.5 * w, y + 0.5 * h], dtype=np.float32)
    if w > aspect_wh * h:
        h = w / aspect_wh
    else:
        w = h * aspect_wh
    return center, np.array([w, h], dtype=np.float32) * padding


def get_affine(center, scale, rotation_deg: float, out_size_hw: tuple[int, int],
               inverse: bool = False, flip: bool = False) -> np.ndarray:
    """(2, 3) float64 affine image -> crop pixels (crop -> image if ``inverse``).

    crop = T(W/2, H/2) . S(W/w, H/h) . R(-rotation) . T(-center) [. Mirror(x -> 2 cx - x)]. A positive rotation turns the image content counter-clockwise in the
    crop, as mmpose's ``get_warp_matrix`` does. Built in closed form (no 3-point solve) so the inverse
    is exact to float64 rounding.
    """
    h_out, w_out = out_size_hw
    cx, cy = float(center[0]), float(center[1])
    sx, sy = w_out / float(scale[0]), h_out / float(scale[1])
    t = np.deg2rad(rotation_deg)
    c, s = np.cos(t), np.sin(t)
    # R(-t) = [[c, s], [-s, c]], rows scaled per axis.
    a = np.array([[sx * c, sx * s], [-sy * s, sy * c]])
    m = np.zeros((3, 3))
    m[:2, :2] = a
    m[:2, 2] = np.array([0.5 * w_out, 0.5 * h_out]) - a @ np.array([cx, cy])
    m[2, 2] = 1.0
    if flip:
        m = m @ np.array([[-1.0, 0.0, 2.0 * cx], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    if inverse:
        m = np.linalg.inv(m)
    return m[:2]


def transform_points(points, m: np.ndarray) -> np.ndarray:
    """points (..., 2) through the (2, 3) affine ``m`` -> (..., 2) float32."""
    p = np.asarray(points, dtype=np.float64)
    return (p @ m[:, :2].T + m[:, 2]).astype(np.float32)


def warp(image: np.ndarray, m: np.ndarray, out_size_hw: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, C) image -> uint8 (h, w, C) crop (bilinear, black outside the image)."""
    h, w = out_size_hw
    return cv2.warpAffine(image, m, (int(w), int(h)), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def half_body(keypoints: np.ndarray, spec: KeypointSpec, aspect_wh: float,
              rng: np.random.Generator, padding: float = 1.5, min_total: int = 9,
              min_upper: int = 2, min_lower: int = 3) -> tuple[np.ndarray, np.ndarray] | None:
    """Half-body box (mmpose ``RandomHalfBody``): the labelled upper or lower joints' extent.

    keypoints (K, 3). Upper is picked with p = 0.5 when it has at least ``min_upper`` labelled
    joints, else lower (needs ``min_lower``). None when the person has fewer than ``min_total``
    labelled joints or the chosen half has too few; the caller then keeps the full box.
    """
    labelled = keypoints[:, 2] > 0
    if labelled.sum() < min_total:
        return None
    upper_mask = np.zeros(len(keypoints), bool)
    upper_mask[list(spec.upper_body)] = True
    upper = keypoints[labelled & upper_mask, :2]
    lower = keypoints[labelled & ~upper_mask, :2]
    if rng.random() < 0.5 and len(upper) >= min_upper:
        pts = upper
    elif len(lower) >= min_lower:
        pts = lower
    elif len(upper) >= min_upper:
        pts = upper
    else:
        return None
    lo, hi = pts.min(0), pts.max(0)
    box = np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]], np.float32)
    if box[2] <= 0 and box[3] <= 0:
        return None
    return box_to_center_scale(box, aspect_wh, padding)


def sample_crop(bbox_xywh, keypoints: np.ndarray, spec: KeypointSpec, data_cfg,
                aspect_wh: float, rng: np.random.Generator | None) -> CropParams:
    """Crop parameters for one person; random (train) when ``rng`` is given, else the plain box.

    Order as in mmpose: half-body (p = half_body_prob) replaces the box, then the scale is
    multiplied by U(scale_range), rotation ~ U(-rotation, rotation) with p = rotation_prob, and
    a flip with p = flip_prob. Every draw comes from ``rng`` and the draws happen in a fixed
    order, so one seed gives one crop.
    """
    center, scale = box_to_center_scale(bbox_xywh, aspect_wh, data_cfg.padding)
    if rng is None:
        return CropParams(center, scale)
    # Draw all random numbers up front so each decision uses the same stream position.
    u_half, u_scale, u_rot_p, u_rot, u_flip = rng.random(5)
    if u_half < data_cfg.half_body_prob:
        hb = half_body(keypoints, spec, aspect_wh, rng)
        if hb is not None:
            center, scale = hb
    lo, hi = data_cfg.scale_range
    scale = scale * np.float32(lo + (hi - lo) * u_scale)
    rot = (2.0 * u_rot - 1.0) * data_cfg.rotation if u_rot_p < data_cfg.rotation_prob else 0.0
    return CropParams(center, scale, float(rot), bool(u_flip < data_cfg.flip_prob))


def back_to_image(coords_crop, center, scale, input_size_hw: tuple[int, int]):
    """Crop pixels (B, K, 2) -> image pixels, the inverse of an unrotated, unflipped crop.

    center, scale (B, 2). Works on numpy arrays and torch tensors alike (evaluation decodes
    on the device): ``x = (x_c - W/2) * w / W + cx``.
    """
    h, w = input_size_hw
    c = center[..., None, :]
    s = scale[..., None, :]
    x = (coords_crop[..., 0] - 0.5 * w) * (s[..., 0] / w) + c[..., 0]
    y = (coords_crop[..., 1] - 0.5 * h) * (s[..., 1] / h) + c[..., 1]
    if torch.is_tensor(x):
        return torch.stack([x, y], dim=-1)
    return np.stack([x, y], axis=-1)
