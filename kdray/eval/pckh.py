"""MPII PCKh@0.5 per joint group, as the standard MPII evaluation (and mmpose) computes it.

A joint counts only where the GT has ``joints_vis = 1``. It is correct when
``||pred - gt|| <= thr * head_size`` (thr = 0.5). Head size (docs/methods.md 1.4):

* ``0.6 * ||headbox[1] - headbox[0]||`` (the head-box diagonal; MPII's SC_BIAS = 0.6) for a
  person with a ``headboxes`` field ``[[x1, y1], [x2, y2]]``, or from the ``headboxes`` argument;
* decision, when there is no head box: ``0.6 * ||head_top(9) - upper_neck(8)||`` of the GT. A
  person whose head top or upper neck is unlabelled then has no head size and is left out
  (counted in ``skipped_persons``). ``head_size_source`` says which rule was used:
  ``"headbox"``, ``"head_top_upper_neck"`` or ``"mixed"``.

Groups (``MPII_PCKH_GROUPS``): per-joint PCKh, left and right averaged, as the standard script
does. ``Mean``: per-joint PCKh weighted by each joint's count, pelvis (6) and thorax (7) left out
(the standard script masks them), i.e. the share of all counted joints that are correct.

Predictions file for ``kdray eval --metric pckh``: a JSON list aligned with the GT list, each
entry either ``{"joints": [[x, y], ...16]}`` or a plain ``[[x, y], ...16]`` list (a third value
per joint, a score, is ignored).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kdray.data.coco import DataError, fail, load_json
from kdray.data.keypoints import MPII_PCKH_GROUPS

SC_BIAS = 0.6            # head size = 0.6 x head-box diagonal (MPII's evaluation constant)
HEAD_TOP, UPPER_NECK = 9, 8
MEAN_EXCLUDED = (6, 7)   # pelvis, thorax: not in the standard Mean


def _array(value, src, where: str, field: str, expected: str) -> np.ndarray:
    """``value`` as float64; ragged rows (a joint with one coordinate), strings or objects are a
    DataError naming the field, not numpy's "inhomogeneous shape" traceback."""
    try:
        return np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise fail(src, where, field, f"expected {expected} (numbers, rows of equal "
                                      f"length)") from None


def _gt_arrays(gt) -> tuple[np.ndarray, np.ndarray, list, str | Path]:
    """GT persons -> joints (N, 16, 2), visibility (N, 16) bool, per-person head boxes or None."""
    src = gt if isinstance(gt, (str, Path)) else "<gt list>"
    persons = load_json(gt) if isinstance(gt, (str, Path)) else gt
    if not isinstance(persons, list) or not persons:
        raise fail(src, "top level", "(whole file)", "expected a non-empty list of MPII persons")
    joints, vis, boxes = [], [], []
    for i, p in enumerate(persons):
        where = f"person #{i}"
        for key in ("joints", "joints_vis"):
            if not isinstance(p, dict) or key not in p:
                raise fail(src, where, key, "missing")
        j = _array(p["joints"], src, where, "joints", "16 [x, y] pairs")
        v = _array(p["joints_vis"], src, where, "joints_vis", "16 values, each 0 or 1")
        if j.shape != (16, 2) or not np.all(np.isfinite(j)):
            raise fail(src, where, "joints", f"expected 16 finite [x, y] pairs, got {j.shape}")
        if v.shape != (16,) or not np.all(np.isin(v, (0, 1))):
            raise fail(src, where, "joints_vis", "expected 16 values, each 0 or 1")
        hb = p.get("headboxes")
        if hb is not None:
            hb = _array(hb, src, where, "headboxes", "[[x1, y1], [x2, y2]]")
            if hb.shape != (2, 2) or not np.all(np.isfinite(hb)):
                raise fail(src, where, "headboxes", "expected [[x1, y1], [x2, y2]]")
        joints.append(j)
        vis.append(v > 0)
        boxes.append(hb)
    return np.stack(joints), np.stack(vis), boxes, src


def _pred_array(preds, n: int) -> np.ndarray:
    """(N, 16, 2) array, or a predictions JSON path / list in the format of the module doc."""
    src = preds if isinstance(preds, (str, Path)) else "<predictions>"
    if isinstance(preds, (str, Path)):
        preds = load_json(preds)
    if isinstance(preds, list):
        rows = []
        for i, p in enumerate(preds):
            if isinstance(p, dict):
                if "joints" not in p:
                    raise fail(src, f"prediction #{i}", "joints", "missing")
                p = p["joints"]
            try:
                arr = np.asarray(p, np.float64)
            except (TypeError, ValueError):
                raise fail(src, f"prediction #{i}", "joints", "not a 16 x 2 list") from None
            if arr.ndim != 2 or arr.shape[0] != 16 or arr.shape[1] < 2:
                raise fail(src, f"prediction #{i}", "joints", f"expected 16 x 2, got {arr.shape}")
            rows.append(arr[:, :2])
        preds = np.stack(rows) if rows else np.zeros((0, 16, 2))
    # a JSON object instead of a list fails here, naming the file
    preds = _array(preds, src, "top level", "joints", "a list of 16 x 2 joint lists")
    if preds.ndim != 3 or preds.shape[1] != 16 or preds.shape[2] < 2:
        raise fail(src, "top level", "joints", f"expected (N, 16, 2), got {preds.shape}")
    if len(preds) != n:
        raise fail(src, "top level", "joints", f"{len(preds)} predictions for {n} GT persons")
    if not np.all(np.isfinite(preds[..., :2])):
        raise fail(src, "top level", "joints", "contains NaN or infinity")
    return preds[..., :2]


def head_sizes(joints: np.ndarray, vis: np.ndarray, boxes: list) -> tuple[np.ndarray, str]:
    """(N,) head sizes (NaN where none can be formed) and the rule used (module docstring)."""
    sizes = np.full(len(joints), np.nan)
    used = set()
    for i, (j, v, hb) in enumerate(zip(joints, vis, boxes)):
        if hb is not None:
            sizes[i] = SC_BIAS * np.linalg.norm(hb[1] - hb[0])
            used.add("headbox")
        else:
            used.add("head_top_upper_neck")
            if v[HEAD_TOP] and v[UPPER_NECK]:
                sizes[i] = SC_BIAS * np.linalg.norm(j[HEAD_TOP] - j[UPPER_NECK])
    sizes[~(sizes > 0)] = np.nan   # a zero-size head cannot normalise anything
    return sizes, used.pop() if len(used) == 1 else "mixed"


def evaluate_pckh(gt, preds, threshold: float = 0.5, headboxes=None) -> dict:
    """PCKh@threshold in percent. ``gt``: MPII JSON path or list of persons; ``preds``: (N, 16, 2)
    image pixels aligned with the GT list, or a predictions JSON (module docstring);
    ``headboxes``: optional (N, 2, 2) array overriding the persons' ``headboxes`` fields.
    Keys: Head, Shoulder, Elbow, Wrist, Hip, Knee, Ankle, Mean (None where no joint counted),
    plus ``head_size_source`` and ``skipped_persons``."""
    joints, vis, boxes, src = _gt_arrays(gt)
    pred = _pred_array(preds, len(joints))
    if headboxes is not None:
        hb = np.asarray(headboxes, np.float64)
        if hb.shape != (len(joints), 2, 2):
            raise DataError(f"headboxes: field 'headboxes': expected ({len(joints)}, 2, 2), "
                            f"got {hb.shape}")
        boxes = list(hb)
    size, source = head_sizes(joints, vis, boxes)
    counted = vis & np.isfinite(size)[:, None]                       # (N, 16)
    err = np.linalg.norm(pred - joints, axis=-1) / np.where(np.isfinite(size), size, 1.0)[:, None]
    hit = (err <= threshold) & counted
    count = counted.sum(0).astype(np.float64)                          # (16,)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_joint = 100.0 * hit.sum(0) / count                         # NaN where count == 0
    out: dict = {}
    for name, idx in MPII_PCKH_GROUPS.items():
        vals = per_joint[list(idx)]
        vals = vals[np.isfinite(vals)]
        out[name] = float(vals.mean()) if vals.size else None
    keep = np.ones(16, bool)
    keep[list(MEAN_EXCLUDED)] = False
    total = count[keep].sum()
    out["Mean"] = float(100.0 * hit[:, keep].sum() / total) if total else None
    out["head_size_source"] = source
    out["skipped_persons"] = int(np.count_nonzero(~np.isfinite(size)))
    return out
