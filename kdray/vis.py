"""Pose drawing and contact sheets (for `kdray data synth --preview`, `kdray predict`, reports).

Style: the person's left limbs orange, right limbs blue, the centre green; visible joints
(v=2, or a score above the threshold) filled, occluded joints (v=1) hollow rings, unlabelled
(v=0) not drawn. Images are BGR uint8 (OpenCV order) throughout.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from kdray.data.keypoints import KeypointSpec, spec_for_count

LEFT, RIGHT, CENTRE = (0, 140, 255), (255, 120, 0), (0, 200, 0)   # BGR


def _side(name: str) -> tuple[int, int, int]:
    return LEFT if name.startswith("left") else RIGHT if name.startswith("right") else CENTRE


def draw_pose(img_bgr: np.ndarray, keypoints: np.ndarray,
              skeleton: Sequence | KeypointSpec | None = None,
              scores: np.ndarray | None = None, spec: KeypointSpec | None = None,
              score_thr: float = 0.3, visible_style: bool = True, radius: int | None = None,
              thickness: int | None = None, copy: bool = True) -> np.ndarray:
    """Draw one pose. ``keypoints`` is (K, 3) = (x, y, v) with COCO v in {0, 1, 2}, or (K, 2)
    with ``scores`` (K,) (a joint is drawn when its score >= ``score_thr``). A (K, 3) array whose
    third column is not all in {0, 1, 2} is read as (x, y, score). ``skeleton`` is 0-based joint
    pairs or a KeypointSpec (default: the table of ``spec`` or ``spec_for_count(K)``); the spec
    also names the joints, which picks the left/right colours. With ``visible_style``
    occluded joints (v=1) are hollow rings and their limbs thin; otherwise all look alike."""
    if isinstance(skeleton, KeypointSpec):
        spec, skeleton = skeleton, None
    out = img_bgr.copy() if copy else img_bgr
    kp = np.asarray(keypoints, np.float64)
    if kp.shape[1] == 3 and scores is None and np.isin(kp[:, 2], (0, 1, 2)).all():
        state = kp[:, 2].astype(int)                                  # 0 / 1 / 2
    else:
        s = kp[:, 2] if scores is None else np.asarray(scores, np.float64).ravel()
        state = np.where(s >= score_thr, 2, 0)
    if not visible_style:
        state = np.where(state > 0, 2, 0)
    if spec is None:
        try:
            spec = spec_for_count(len(kp))
        except ValueError:
            spec = None
    names = spec.joints if spec else ("",) * len(kp)
    skeleton = skeleton if skeleton is not None else (spec.skeleton if spec else ())
    scale = max(out.shape[:2]) / 256
    r = radius or max(2, int(round(2.5 * scale)))
    t = thickness or max(1, int(round(1.5 * scale)))
    pt = lambda j: (int(round(kp[j, 0] * 16)), int(round(kp[j, 1] * 16)))  # noqa: E731
    for a, b in skeleton:
        if state[a] and state[b]:
            col = _side(names[a]) if _side(names[a]) != CENTRE else _side(names[b])
            w = t if state[a] == 2 and state[b] == 2 else max(1, t // 2)
            cv2.line(out, pt(a), pt(b), col, w, cv2.LINE_AA, 4)
    for j in np.flatnonzero(state):
        filled = state[j] == 2
        cv2.circle(out, pt(j), r * 16, _side(names[j]), -1 if filled else max(1, t), cv2.LINE_AA, 4)
        if filled:   # dark rim keeps joints readable on any background
            cv2.circle(out, pt(j), r * 16, (20, 20, 20), 1, cv2.LINE_AA, 4)
    return out


def make_sheet(images: Sequence[np.ndarray], ncols: int, pad: int = 2,
               bg: tuple[int, int, int] = (40, 40, 40)) -> np.ndarray:
    """Grid of images, row-major, each in a cell as large as the largest one (top-left
    aligned). Size: rows*(h+pad)+pad by ncols*(w+pad)+pad, rows = ceil(len/ncols)."""
    if not images:
        raise ValueError("make_sheet needs at least one image")
    ncols = max(1, min(ncols, len(images)))
    rows = -(-len(images) // ncols)
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    sheet = np.empty((rows * (h + pad) + pad, ncols * (w + pad) + pad, 3), np.uint8)
    sheet[:] = bg
    for i, im in enumerate(images):
        im = im if im.ndim == 3 else cv2.cvtColor(im, cv2.COLOR_GRAY2BGR)
        y, x = pad + (i // ncols) * (h + pad), pad + (i % ncols) * (w + pad)
        sheet[y:y + im.shape[0], x:x + im.shape[1]] = im
    return sheet


def crop_person(img_bgr: np.ndarray, bbox: Sequence[float], crop_hw: tuple[int, int],
                padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """Top-down crop: the box (xywh) grown to the crop's aspect ratio and by ``padding``, warped
    to ``crop_hw`` (H, W). Returns (crop, 2x3 affine image -> crop)."""
    H, W = crop_hw
    x, y, w, h = map(float, bbox)
    c = np.array([x + w / 2, y + h / 2])
    if w * H > h * W:
        h = w * H / W
    else:
        w = h * W / H
    s = W / (w * padding)
    M = np.array([[s, 0, W / 2 - s * c[0]], [0, s, H / 2 - s * c[1]]])
    crop = cv2.warpAffine(img_bgr, M, (W, H), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return crop, M


def preview_sheet(ann_file: str | Path, image_dir: str | Path, out_png: str | Path, n: int = 16,
                  crop_hw: tuple[int, int] = (128, 96), seed: int = 0, ncols: int = 8,
                  pad: int = 2) -> Path:
    """PNG grid of ``n`` random person crops (COCO-format ``ann_file``) with their skeletons.
    Size: rows*(crop_h+pad)+pad by min(ncols, n)*(crop_w+pad)+pad, rows = ceil(n/ncols)."""
    d = json.loads(Path(ann_file).read_text())
    images = {im["id"]: im for im in d["images"]}
    anns = [a for a in d["annotations"] if a.get("num_keypoints", 1) > 0]
    if not anns:
        raise ValueError(f"{ann_file}: no annotated persons")
    pick = np.random.default_rng(seed).choice(len(anns), size=min(n, len(anns)), replace=False)
    tiles = []
    for i in sorted(pick):
        a = anns[i]
        path = Path(image_dir) / images[a["image_id"]]["file_name"]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"cannot read image {path}")
        crop, M = crop_person(img, a["bbox"], crop_hw)
        kp = np.array(a["keypoints"], np.float64).reshape(-1, 3)
        kp[:, :2] = kp[:, :2] @ M[:, :2].T + M[:, 2]
        tiles.append(draw_pose(crop, kp, copy=False))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), make_sheet(tiles, ncols, pad))
    return out


def pose_sheet(checkpoint, cfg, out_png: Path, n: int = 12,
               crop_hw: tuple[int, int] = (128, 96)) -> Path:
    """PNG sheet of predicted poses on the first ``n`` val persons (whole-image inference;
    ``cfg``: the ExperimentConfig whose val split to draw)."""
    from kdray.data.coco import load_dataset, read_image
    from kdray.data.keypoints import spec_for
    from kdray.inference import Predictor, model_from_checkpoint

    module, meta = model_from_checkpoint(checkpoint)
    predict = Predictor(module, meta)
    records, _ = load_dataset(cfg.data, "val")
    spec = spec_for(meta["dataset"])
    tiles = []
    for rec in records[:n]:
        image = read_image(rec.image_path)
        kp = predict(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), rec.bbox[None])[0]
        crop, m = crop_person(image, rec.bbox, crop_hw)
        xy = kp[:, :2] @ m[:, :2].T + m[:, 2]
        # Every joint is drawn: SimCC confidences (max of a smoothed softmax) stay far below
        # draw_pose's default 0.3 threshold even when the joint is right.
        tiles.append(draw_pose(crop, xy, spec, scores=kp[:, 2], score_thr=0.0))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_png), make_sheet(tiles, ncols=6))
    return out_png


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for h in history for k in h if k.startswith("loss")})
    vals = sorted({k for h in history for k in h if k.startswith("val_") and "AP" in k})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for k in keys:
        pts = [(h["epoch"], h[k]) for h in history if k in h]
        axes[0].plot(*zip(*pts), marker="o", label=k)
    axes[0].set(xlabel="epoch", ylabel="loss", yscale="log", title="training losses")
    for k in vals:
        pts = [(h["epoch"], h[k]) for h in history if k in h]
        axes[1].plot(*zip(*pts), marker="o", label=k)
    axes[1].set(xlabel="epoch", ylabel="%", title="validation")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
