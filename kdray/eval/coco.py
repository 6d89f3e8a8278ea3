"""OKS-based AP/AR through pycocotools: COCO, and CrowdPose as its official evaluator scores it.

OKS (COCO keypoint evaluation): ``OKS = mean_j exp(-d_j^2 / (2 s^2 k_j^2))`` over the GT's
labelled joints, with ``k_j = 2 sigma_j`` and ``s^2`` the GT ``area`` (pycocotools' computeOks).
CrowdPose (docs/methods.md 1.4) changes three things, all through COCOeval's params and the GT:
its 14 sigmas, ``s^2 = 0.53 * w * h`` of the GT box (the GT ``area`` is overwritten), maxDets 20
and a single "all" area range; AP^E / AP^M / AP^H re-run COCOeval on the images whose
``crowdIndex`` is < 0.2, in [0.2, 0.8) and >= 0.8. A bucket with no image reports ``None``
(``null`` in JSON), as does any metric with no GT to score. All numbers are percent.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path

import numpy as np

from kdray.data.coco import (DataError, _number, _numbers, fail,  # the readers' field checks
                             load_json)
from kdray.data.keypoints import spec_for_count

METRICS = ("coco", "crowdpose", "pckh")
COCO_KEYS = ("AP", "AP50", "AP75", "APM", "APL", "AR")
BUCKET_KEYS = ("AP_easy", "AP_medium", "AP_hard")
CROWDPOSE_KEYS = ("AP", "AP50", "AP75", "AR") + BUCKET_KEYS
CROWD_BUCKETS = {"easy": (0.0, 0.2), "medium": (0.2, 0.8), "hard": (0.8, math.inf)}
CROWDPOSE_AREA_FACTOR = 0.53   # the official CrowdPose evaluator's OKS scale: 0.53 * w * h


def to_coco_results(image_ids, coords, scores, box_scores, category_id: int = 1,
                    score_thr: float = 0.2) -> list[dict]:
    """Predictions -> COCO keypoint results. ``coords`` (N, K, 2) image pixels, ``scores`` (N, K),
    ``box_scores`` (N,). Person score = box score x mean of the joint scores above ``score_thr``
    (0 when none is), the rescoring of mmpose's top-down COCO evaluation."""
    coords = np.asarray(coords, np.float64)
    scores = np.asarray(scores, np.float64)
    box_scores = np.asarray(box_scores, np.float64).reshape(-1)
    if coords.ndim != 3 or coords.shape[2] != 2 or scores.shape != coords.shape[:2] \
            or len(box_scores) != len(coords) or len(image_ids) != len(coords):
        raise ValueError(f"shapes disagree: coords {coords.shape}, scores {scores.shape}, "
                         f"box_scores {box_scores.shape}, image_ids {len(image_ids)}")
    out = []
    for img_id, xy, s, bs in zip(image_ids, coords, scores, box_scores):
        valid = s > score_thr
        kpt_score = float(s[valid].mean()) if valid.any() else 0.0
        flat = np.concatenate([xy, s[:, None]], axis=1).reshape(-1)
        out.append({"image_id": int(img_id), "category_id": int(category_id),
                    "keypoints": [float(v) for v in flat], "score": float(bs) * kpt_score})
    return out


def _prepare_gt(gt, metric: str, buckets: bool) -> tuple[dict, str | Path, int]:
    """A deep copy of the GT dict made COCOeval-ready: ``num_keypoints`` and ``area`` filled."""
    src = gt if isinstance(gt, (str, Path)) else "<gt dict>"
    data = copy.deepcopy(load_json(gt) if isinstance(gt, (str, Path)) else gt)
    if not isinstance(data, dict):
        raise fail(src, "top level", "(whole file)", "expected a COCO keypoint JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise fail(src, "top level", key, "missing or not a list")
    cats = [c for c in data["categories"] if isinstance(c, dict) and c.get("keypoints")]
    if not cats:
        raise fail(src, "categories", "keypoints", "no category lists keypoint names")
    if not isinstance(cats[0]["keypoints"], list):
        raise fail(src, "categories", "keypoints", "expected a list of joint names")
    for c in cats:   # results name their category by this id
        if not _is_int(c.get("id")):
            raise fail(src, "categories", "id", f"expected an integer, got {c.get('id')!r}")
    k = len(cats[0]["keypoints"])
    img_ids = _image_ids(data["images"], src)
    ann_ids: set = set()
    for i, ann in enumerate(data["annotations"]):
        # the index always (a record without a usable id is still found), the id when it has one
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"annotation #{i}" + (f" (id {ann_id})" if _is_int(ann_id) else "")
        for key in ("id", "image_id", "keypoints", "bbox"):
            if not isinstance(ann, dict):
                raise fail(src, where, key, f"record is a {type(ann).__name__}, expected an object")
            if key not in ann:
                raise fail(src, where, key, "missing")
        if not _is_int(ann_id):
            raise fail(src, where, "id", f"expected an integer, got {ann_id!r}")
        if ann_id in ann_ids:   # pycocotools indexes by id: a duplicate would shadow another
            raise fail(src, where, "id", "duplicate annotation id")
        ann_ids.add(ann_id)
        if not _is_int(ann["image_id"]) or ann["image_id"] not in img_ids:
            raise fail(src, where, "image_id", f"unknown image id {ann['image_id']!r}")
        kp = _numbers(ann["keypoints"], 3 * k, src, where, "keypoints")  # NaN, strings, length
        vis = kp[2::3]
        if not np.all(np.isin(vis, (0, 1, 2))):
            j = int(np.argmax(~np.isin(vis, (0, 1, 2))))
            raise fail(src, where, "keypoints", f"visibility of joint {j} is {vis[j]:g}, not 0/1/2")
        box = _numbers(ann["bbox"], 4, src, where, "bbox")
        if box[2] < 0 or box[3] < 0:
            raise fail(src, where, "bbox", f"width and height must be >= 0, got {ann['bbox']}")
        ann.setdefault("num_keypoints", int(np.count_nonzero(vis > 0)))
        ann.setdefault("iscrowd", 0)
        if ann["iscrowd"] not in (0, 1):
            raise fail(src, where, "iscrowd", f"expected 0 or 1, got {ann['iscrowd']!r}")
        w, h = float(box[2]), float(box[3])
        if metric == "crowdpose":
            ann["area"] = CROWDPOSE_AREA_FACTOR * w * h   # the GT area is ignored by design
        else:
            ann["area"] = _number(ann.get("area", w * h), src, where, "area")
    if buckets:
        for img in data["images"]:
            ci = img.get("crowdIndex")
            if isinstance(ci, bool) or not isinstance(ci, (int, float)) or not math.isfinite(ci):
                raise fail(src, f"image id {img.get('id')}", "crowdIndex",
                           "missing (CrowdPose E/M/H buckets need it)" if ci is None else
                           f"expected a finite number, got {ci!r}")
    return data, src, k


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _image_ids(images: list, src) -> set[int]:
    """The GT's image ids; each image must be an object with a unique integer ``id``."""
    ids: set[int] = set()
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            raise fail(src, f"image #{i}", "id", f"record is a {type(img).__name__}, "
                                                 f"expected an object")
        if not _is_int(img.get("id")):
            raise fail(src, f"image #{i}", "id", "missing" if "id" not in img else
                       f"expected an integer, got {img['id']!r}")
        if img["id"] in ids:
            raise fail(src, f"image #{i}", "id", f"duplicate image id {img['id']}")
        ids.add(img["id"])
    return ids


def _prepare_results(results, gt: dict, k: int) -> list[dict]:
    src = results if isinstance(results, (str, Path)) else "<results>"
    dets = load_json(results) if isinstance(results, (str, Path)) else results
    if not isinstance(dets, list):
        raise fail(src, "top level", "(whole file)", "expected a list of results")
    img_ids = {img["id"] for img in gt["images"]}
    cat_ids = [c.get("id") for c in gt["categories"] if isinstance(c, dict) and c.get("keypoints")]
    clean = []
    for i, d in enumerate(dets):
        where = f"result #{i}"
        for key in ("image_id", "keypoints", "score"):
            if not isinstance(d, dict) or key not in d:
                raise fail(src, where, key, "missing")
        if not _is_int(d["image_id"]) or d["image_id"] not in img_ids:
            raise fail(src, where, "image_id", f"image id {d['image_id']!r} is not in the GT")
        cat = d.get("category_id", cat_ids[0])
        if not _is_int(cat):
            raise fail(src, where, "category_id", f"expected an integer, got {cat!r}")
        if cat not in cat_ids:  # COCOeval would score it against no GT: AP 0 without a word
            raise fail(src, where, "category_id", f"category {cat} is not a keypoint category "
                                                  f"of the GT (its keypoint categories: {cat_ids})")
        try:
            kp = np.asarray(d["keypoints"], np.float64).reshape(-1)
        except (TypeError, ValueError):
            kp = np.zeros(0)
        if kp.size != 3 * k or not np.all(np.isfinite(kp)):
            raise fail(src, where, "keypoints", f"expected {3 * k} finite numbers")
        if isinstance(d["score"], bool) or not isinstance(d["score"], (int, float)) \
                or not math.isfinite(d["score"]):
            raise fail(src, where, "score", f"expected a finite number, got {d['score']!r}")
        # only these fields: a 'bbox' would make loadRes take the box as the detection's area
        clean.append({"image_id": d["image_id"], "category_id": cat,
                      "keypoints": kp.tolist(), "score": float(d["score"])})
    return clean


def crowd_index_buckets(gt: dict) -> dict[str, list[int]]:
    """Image ids per CrowdPose crowd bucket: easy ci < 0.2, medium 0.2 <= ci < 0.8, hard >= 0.8."""
    return {name: sorted(img["id"] for img in gt["images"] if lo <= img["crowdIndex"] < hi)
            for name, (lo, hi) in CROWD_BUCKETS.items()}


def _quiet(verbose: bool):
    """Silence pycocotools' prints unless ``verbose``."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def _pct(values: np.ndarray) -> float | None:
    """Mean of the valid (> -1) entries in percent; None when COCOeval had nothing to score."""
    values = values[values > -1]
    return float(values.mean() * 100.0) if values.size else None


def _run(coco_gt, coco_dt, sigmas, metric: str, img_ids=None, verbose: bool = False):
    """One COCOeval pass; ``img_ids`` restricts it to a crowd bucket's images."""
    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(coco_gt, coco_dt, "keypoints")
    ev.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
    if metric == "crowdpose":
        ev.params.maxDets = [20]
        ev.params.areaRng, ev.params.areaRngLbl = [[0.0, 1e10]], ["all"]
    if img_ids is not None:
        ev.params.imgIds = list(img_ids)
    with _quiet(verbose):
        ev.evaluate()
        ev.accumulate()
        if metric == "coco":
            ev.summarize()
    return ev


def _summary(ev) -> dict:
    """AP / AP50 / AP75 / AR at the last maxDets (20), area 'all' (the CrowdPose summary)."""
    prec, rec = ev.eval["precision"][..., 0, -1], ev.eval["recall"][..., 0, -1]  # (T,R,K), (T,K)
    thrs = ev.params.iouThrs
    at = {t: int(np.argmin(np.abs(thrs - t))) for t in (0.5, 0.75)}
    return {"AP": _pct(prec), "AP50": _pct(prec[at[0.5]]), "AP75": _pct(prec[at[0.75]]),
            "AR": _pct(rec)}


def evaluate_coco(gt, results, metric: str = "coco", verbose: bool = False,
                  crowd_buckets: bool = False) -> dict:
    """OKS AP/AR in percent. ``gt``: path or COCO dict; ``results``: path or list of
    ``{image_id, category_id, keypoints (flat x, y, s), score}``. Keys: COCO ``AP, AP50, AP75,
    APM, APL, AR``; CrowdPose ``AP, AP50, AP75, AR, AP_easy, AP_medium, AP_hard``.
    ``crowd_buckets`` adds ``AP_easy/medium/hard`` to the COCO metric too (needs ``crowdIndex``
    per image; CrowdPose always has them)."""
    if metric not in ("coco", "crowdpose"):
        raise ValueError(f"metric must be 'coco' or 'crowdpose', got {metric!r}")
    buckets = crowd_buckets or metric == "crowdpose"
    data, src, k = _prepare_gt(gt, metric, buckets)
    try:
        spec = spec_for_count(k)
    except ValueError as exc:
        raise fail(src, "categories", "keypoints", str(exc)) from None
    if spec.sigmas is None or (metric == "crowdpose" and spec.name != "crowdpose"):
        raise DataError(f"{src}: metric {metric!r} cannot score {k} keypoints (no OKS sigmas)")
    dets = _prepare_results(results, data, k)
    bucket_ids = crowd_index_buckets(data) if buckets else {}
    if not dets:  # pycocotools cannot load an empty result list; nothing found scores 0
        keys = COCO_KEYS if metric == "coco" else CROWDPOSE_KEYS[:4]
        out = {key: 0.0 for key in keys}
        out.update({f"AP_{name}": 0.0 if ids else None for name, ids in bucket_ids.items()})
        return out
    from pycocotools.coco import COCO

    with _quiet(verbose):
        coco_gt = COCO()
        coco_gt.dataset = data
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
    ev = _run(coco_gt, coco_dt, spec.sigmas, metric, verbose=verbose)
    if metric == "coco":   # stats 0-5: AP, AP50, AP75, APM, APL, AR (maxDets 20)
        out = {key: None if s < 0 else float(s) * 100.0 for key, s in zip(COCO_KEYS, ev.stats)}
    else:
        out = _summary(ev)
    for name, ids in bucket_ids.items():  # re-run COCOeval on each bucket's images only
        out[f"AP_{name}"] = _summary(_run(coco_gt, coco_dt, spec.sigmas, metric, ids))["AP"] \
            if ids else None
    if verbose:
        print(f"{metric}:", out)
    return out


def evaluate_file(gt_path, pred_path, metric: str, verbose: bool = False) -> dict:
    """What ``kdray eval`` runs. ``coco`` / ``crowdpose``: ``pred_path`` is a COCO keypoint
    results JSON; ``pckh``: a list aligned with the MPII GT list, each entry
    ``{"joints": [[x, y], ...]}`` or a plain 16 x 2 list (see :mod:`kdray.eval.pckh`)."""
    if metric == "pckh":
        from kdray.eval.pckh import evaluate_pckh
        return evaluate_pckh(gt_path, pred_path)
    if metric in ("coco", "crowdpose"):
        return evaluate_coco(gt_path, pred_path, metric=metric, verbose=verbose)
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
