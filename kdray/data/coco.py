"""Readers: COCO / CrowdPose keypoint JSON (GT or detector boxes) and MPII JSON -> person records.

Top-down pose estimation (docs/methods.md section 1) works on one person box at a time, so every
reader returns a flat list of :class:`PersonRecord` plus the :class:`KeypointSpec` whose
keypoint count matches the file (any COCO-format keypoint dataset with 17, 14 or 16 joints is
accepted). Every malformed input raises :class:`DataError` naming the file, the record and the
field, before any training starts; image readability is checked lazily with :func:`read_image`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdray.data.keypoints import KeypointSpec, spec_for, spec_for_count


class DataError(ValueError):
    """A data file is malformed: the message names the file, the record and the field."""


def fail(file, where: str, field: str, msg: str) -> DataError:
    """Build the one error format every reader uses: ``FILE: RECORD: field 'F': MSG``."""
    return DataError(f"{file}: {where}: field {field!r}: {msg}")


@dataclass
class PersonRecord:
    """One person box to crop. ``bbox`` (4,) float32 xywh in image pixels; ``keypoints`` (K, 3)
    float32 (x, y, v), v in {0, 1, 2} (all zero for detector boxes). ``ann_id``: the COCO
    annotation id; for detector boxes ``-1 - index`` in the detector file (negative: no GT
    person); for MPII the person's index in the GT list (PCKh predictions follow that order)."""
    image_path: str
    image_id: int
    bbox: np.ndarray
    keypoints: np.ndarray
    score: float = 1.0
    area: float = 0.0
    ann_id: int = -1
    center: np.ndarray | None = None   # MPII only: (2,) the toolbox-adjusted person centre
    scale: float | None = None         # MPII only: person height / 200 as annotated


def load_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing or invalid file becomes a :class:`DataError`."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise fail(path, "file", "(path)", "file not found") from None
    except IsADirectoryError:
        raise fail(path, "file", "(path)", "is a directory, expected a JSON file") from None
    except OSError as exc:  # permissions, a FIFO, a device
        raise fail(path, "file", "(path)", f"cannot be read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fail(path, "file", "(whole file)", f"invalid JSON: {exc}") from None


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as BGR uint8 (H, W, 3); a missing or undecodable file is a DataError."""
    import cv2  # imported here: readers that only parse JSON need no OpenCV

    if not os.path.exists(path):
        raise fail(path, "image", "image", "file does not exist")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise fail(path, "image", "image", "file exists but cannot be decoded (cv2.imread -> None)")
    return img


# --- field checks: each returns the clean value or raises naming file / record / field ---

def _get(obj: dict, key: str, file, where: str):
    if not isinstance(obj, dict):
        raise fail(file, where, key, f"record is a {type(obj).__name__}, expected an object")
    if key not in obj:
        raise fail(file, where, key, "missing")
    return obj[key]


def _numbers(value, n: int | None, file, where: str, field: str) -> np.ndarray:
    """A flat list of finite numbers (of length n when given) as float64."""
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise fail(file, where, field, "expected a list of numbers")
    if n is not None and len(value) != n:
        raise fail(file, where, field, f"expected {n} numbers, got {len(value)}")
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise fail(file, where, field, "contains NaN or infinity")
    return arr


def _number(value, file, where: str, field: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(file, where, field, f"expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise fail(file, where, field, f"must be positive, got {value!r}")
    return float(value)


def _box(value, file, where: str) -> np.ndarray:
    box = _numbers(value, 4, file, where, "bbox")
    if box[2] <= 0 or box[3] <= 0:
        raise fail(file, where, "bbox", f"width and height must be positive, got {list(value)}")
    return box.astype(np.float32)


def _keypoints(value, k: int, file, where: str) -> np.ndarray:
    kp = _numbers(value, 3 * k, file, where, "keypoints").reshape(k, 3)
    bad = ~np.isin(kp[:, 2], (0, 1, 2))
    if bad.any():
        j = int(np.argmax(bad))
        raise fail(file, where, "keypoints", f"visibility of joint {j} is {kp[j, 2]:g}, not 0/1/2")
    return kp.astype(np.float32)


def _image_table(data: dict, file, image_dir) -> dict[int, str]:
    images = _get(data, "images", file, "top level")
    if not isinstance(images, list):
        raise fail(file, "top level", "images", "expected a list")
    table: dict[int, str] = {}
    for i, img in enumerate(images):
        where = f"image #{i}"
        img_id = _get(img, "id", file, where)
        if isinstance(img_id, bool) or not isinstance(img_id, int):
            raise fail(file, where, "id", f"expected an integer, got {img_id!r}")
        name = _get(img, "file_name", file, f"image id {img_id}")
        if not isinstance(name, str) or not name:
            raise fail(file, f"image id {img_id}", "file_name", "expected a non-empty string")
        if img_id in table:
            raise fail(file, f"image id {img_id}", "id", "duplicate image id")
        table[img_id] = os.path.join(str(image_dir), name)
    return table


def _spec(data: dict, file) -> KeypointSpec:
    """The table whose K matches the person category's ``keypoints`` names (else the first
    annotation's length / 3)."""
    cats = [c for c in data.get("categories") or [] if isinstance(c, dict) and c.get("keypoints")]
    anns = data.get("annotations")
    first = anns[0] if isinstance(anns, list) and anns and isinstance(anns[0], dict) else {}
    kps = cats[0]["keypoints"] if cats else first.get("keypoints")
    k = (len(kps) if cats else len(kps) // 3) if isinstance(kps, list) else 0
    try:
        return spec_for_count(k)
    except ValueError as exc:
        raise fail(file, "categories", "keypoints", str(exc)) from None


def _check_images(records: list[PersonRecord], file, mpii: bool = False) -> None:
    """Every referenced image must exist (cheap); decodability is checked lazily by read_image."""
    for path in dict.fromkeys(r.image_path for r in records):
        if not os.path.exists(path):
            r = next(r for r in records if r.image_path == path)
            where, field = (f"person #{r.ann_id}", "image") if mpii else \
                (f"image id {r.image_id}", "file_name")
            raise fail(file, where, field, f"image file {path} does not exist")


def load_coco(ann_file, image_dir, boxes_file=None, score_thr: float = 0.0,
              check_images: bool = True, skip_empty: bool = True
              ) -> tuple[list[PersonRecord], KeypointSpec]:
    """COCO-format keypoint file -> person records with GT boxes, or with detector boxes.

    GT mode keeps one record per annotation, skipping ``iscrowd=1`` and persons with no labelled
    keypoint (``num_keypoints == 0``; COCOeval ignores them too) when ``skip_empty``.
    Detector mode (``boxes_file``, COCO results format ``{image_id, bbox, score,
    category_id}``) keeps the boxes with ``score >= score_thr`` and zero keypoints.
    """
    data = load_json(ann_file)
    if not isinstance(data, dict):
        raise fail(ann_file, "top level", "(whole file)", "expected a JSON object")
    images = _image_table(data, ann_file, image_dir)
    spec = _spec(data, ann_file)
    anns = _get(data, "annotations", ann_file, "top level")
    if not isinstance(anns, list):
        raise fail(ann_file, "top level", "annotations", "expected a list")
    records: list[PersonRecord] = []
    for i, ann in enumerate(anns):
        ann_id = _get(ann, "id", ann_file, f"annotation #{i}")
        where = f"annotation id {ann_id}"
        img_id = _get(ann, "image_id", ann_file, where)
        if not isinstance(img_id, int) or img_id not in images:
            raise fail(ann_file, where, "image_id", f"unknown image id {img_id!r}")
        kp = _keypoints(_get(ann, "keypoints", ann_file, where), spec.num_joints, ann_file, where)
        box = _box(_get(ann, "bbox", ann_file, where), ann_file, where)
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise fail(ann_file, where, "iscrowd", f"expected 0 or 1, got {crowd!r}")
        area = _number(ann.get("area", float(box[2] * box[3])), ann_file, where, "area")
        if boxes_file is not None or (skip_empty and (crowd or not np.any(kp[:, 2] > 0))):
            continue  # detector mode still validates every GT annotation (they are scored)
        records.append(PersonRecord(images[img_id], int(img_id), box, kp, 1.0, area, int(ann_id)))
    if boxes_file is not None:
        records = _detector_records(boxes_file, images, spec, score_thr)
    if check_images:
        _check_images(records, ann_file)
    return records, spec


def _detector_records(boxes_file, images: dict[int, str], spec: KeypointSpec,
                      score_thr: float) -> list[PersonRecord]:
    records = []
    for i, where, det, box, score in _detections(boxes_file):
        img_id = _get(det, "image_id", boxes_file, where)
        if not isinstance(img_id, int) or img_id not in images:
            raise fail(boxes_file, where, "image_id", f"image id {img_id!r} is not in the GT file")
        if det.get("category_id", 1) != 1 or score < score_thr:
            continue  # only person boxes above the threshold, as the pose toolboxes do
        kp = np.zeros((spec.num_joints, 3), np.float32)
        records.append(PersonRecord(images[img_id], int(img_id), box, kp, score,
                                    float(box[2] * box[3]), -1 - i))
    return records


def _detections(boxes_file, default_score: float | None = None):
    """Each detection of a COCO results file with its bbox and score validated:
    (index, "detection #i", record, box (4,), score); ``score`` is required unless a default
    is given."""
    dets = load_json(boxes_file)
    if not isinstance(dets, list):
        raise fail(boxes_file, "top level", "(whole file)", "expected a list of detections")
    for i, det in enumerate(dets):
        where = f"detection #{i}"
        box = _box(_get(det, "bbox", boxes_file, where), boxes_file, where)
        raw = (_get(det, "score", boxes_file, where) if default_score is None
               else det.get("score", default_score))
        yield i, where, det, box, _number(raw, boxes_file, where, "score")


def image_boxes(boxes_file, image_id: int | None, score_thr: float = 0.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) float32 xywh person boxes of one image from a COCO results file (every image's
    when ``image_id`` is None) and their (N,) scores: ``kdray predict --boxes``. Every detection
    is validated first, so a 3-number bbox is an error naming its index, not silently reshaped
    into other boxes."""
    boxes, scores = [], []
    for _, where, det, box, score in _detections(boxes_file, default_score=1.0):
        img = det.get("image_id")
        if img is not None and (isinstance(img, bool) or not isinstance(img, int)):
            raise fail(boxes_file, where, "image_id", f"expected an integer, got {img!r}")
        cat = det.get("category_id", 1)
        if isinstance(cat, bool) or not isinstance(cat, int):
            raise fail(boxes_file, where, "category_id", f"expected an integer, got {cat!r}")
        if (image_id is None or img == image_id) and cat == 1 and score >= score_thr:
            boxes.append(box)   # person boxes only, as the dataset reader keeps them
            scores.append(score)
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    return np.stack(boxes), np.asarray(scores, np.float32)


def load_mpii(ann_file, image_dir, check_images: bool = True
              ) -> tuple[list[PersonRecord], KeypointSpec]:
    """MPII JSON (list of {image, center, scale, joints (16x2), joints_vis}) -> records.

    Box: the square of side ``scale * 200`` around the centre, the centre moved down by
    ``15 * scale`` and by -1 px (MATLAB 1-based -> 0-based) exactly as mmpose's MpiiDataset does;
    joints are kept as given (the frame PCKh compares in). ``joints_vis`` 1 -> v=2, 0 -> v=0.
    Every person is kept, in file order, so ``ann_id`` indexes the GT list.
    """
    data = load_json(ann_file)
    if not isinstance(data, list):
        raise fail(ann_file, "top level", "(whole file)", "expected a list of persons")
    records, ids = [], {}
    for i, p in enumerate(data):
        where = f"person #{i}"
        name = _get(p, "image", ann_file, where)
        if not isinstance(name, str) or not name:
            raise fail(ann_file, where, "image", "expected a non-empty file name")
        center = _numbers(_get(p, "center", ann_file, where), 2, ann_file, where, "center")
        scale = _number(_get(p, "scale", ann_file, where), ann_file, where, "scale", positive=True)
        joints = _get(p, "joints", ann_file, where)
        if not isinstance(joints, list) or len(joints) != 16:
            raise fail(ann_file, where, "joints", "expected 16 [x, y] pairs")
        xy = np.stack([_numbers(j, 2, ann_file, where, "joints") for j in joints])
        vis = _numbers(_get(p, "joints_vis", ann_file, where), 16, ann_file, where, "joints_vis")
        if not np.all(np.isin(vis, (0, 1))):
            raise fail(ann_file, where, "joints_vis", f"values must be 0 or 1, got {vis.tolist()}")
        stem = Path(name).stem
        img_id = int(stem) if stem.isdigit() else ids.setdefault(name, len(ids))
        c = center.copy()
        c[1] += 15.0 * scale
        c -= 1.0
        side = scale * 200.0
        box = np.array([c[0] - side / 2, c[1] - side / 2, side, side], np.float32)
        kp = np.concatenate([xy, 2.0 * vis[:, None]], axis=1).astype(np.float32)
        records.append(PersonRecord(os.path.join(str(image_dir), name), img_id, box, kp, 1.0,
                                    side * side, i, c.astype(np.float32), scale))
    if check_images:
        _check_images(records, ann_file, mpii=True)
    return records, spec_for("mpii")


def image_folder(data_cfg, split: str) -> str:
    """The split's image folder relative to ``data.root``: ``data.train_images`` /
    ``data.val_images`` as COCO ships them (train2017/, val2017/), else ``data.image_dir``."""
    own = data_cfg.train_images if split == "train" else data_cfg.val_images
    return own or data_cfg.image_dir


def load_dataset(data_cfg, split: str) -> tuple[list[PersonRecord], KeypointSpec]:
    """The reader ``data_cfg.dataset`` names, paths resolved against ``data_cfg.root``.

    ``val`` with ``data_cfg.val_boxes`` set uses detector boxes (``det_score_thr``). Training
    keeps only persons with labelled keypoints; ``max_train`` (> 0) keeps the first N training
    records (smoke runs).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(data_cfg.root)
    ann = root / (data_cfg.train_ann if split == "train" else data_cfg.val_ann)
    image_dir = root / image_folder(data_cfg, split)
    if data_cfg.dataset == "mpii":
        records, spec = load_mpii(ann, image_dir)
        if split == "train":
            records = [r for r in records if np.any(r.keypoints[:, 2] > 0)]
    else:
        boxes = root / data_cfg.val_boxes if split == "val" and data_cfg.val_boxes else None
        records, spec = load_coco(ann, image_dir, boxes_file=boxes,
                                  score_thr=data_cfg.det_score_thr)
        expected = spec_for(data_cfg.dataset)
        if spec.num_joints != expected.num_joints:
            raise fail(ann, "categories", "keypoints",
                       f"data.dataset={data_cfg.dataset!r} expects {expected.num_joints} "
                       f"keypoints, the file has {spec.num_joints}")
        spec = expected
    limit = data_cfg.max_train if split == "train" else 0
    return (records[:limit] if limit > 0 else records), spec
