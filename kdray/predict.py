"""``kdray predict``: whole-image top-down inference with detector boxes.

Boxes of the image (by its numeric file name, as COCO results name images) are kept above
``--score-thr``, de-duplicated by NMS (``torchvision.ops.nms`` at ``--nms-iou``), cropped,
run and mapped back to image pixels (kdray.inference.Predictor). The picture shows each box and
its skeleton; ``--json`` writes the keypoints as COCO keypoint results. Without ``--boxes``
(or with none left for the image) the whole image is one person, and the console says so.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kdray.console import log
from kdray.errors import InputError

BOX_BGR = (255, 0, 255)   # magenta: no skeleton colour (kdray.vis) is near it


def person_boxes(boxes_file: str | None, image_path: str, shape: tuple[int, ...],
                 score_thr: float, nms_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) xywh boxes, (N,) scores, best first; the whole image when there are none."""
    h, w = shape[:2]
    whole = np.array([[0, 0, w, h]], np.float32), np.ones(1, np.float32)
    if not boxes_file:
        log("no --boxes: the whole image is treated as one person box")
        return whole
    import torch
    from torchvision.ops import nms

    from kdray.data.coco import image_boxes
    stem = Path(image_path).stem
    boxes, scores = image_boxes(boxes_file, int(stem) if stem.isdigit() else None, score_thr)
    if not len(boxes):
        log(f"--boxes {boxes_file}: no person box of {Path(image_path).name} scores >= "
            f"{score_thr}: the whole image is treated as one person box")
        return whole
    xyxy = torch.from_numpy(np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1))
    keep = nms(xyxy.float(), torch.from_numpy(scores).float(), nms_iou).numpy()
    log(f"{len(boxes)} person boxes >= {score_thr}, {len(keep)} after NMS (IoU {nms_iou})")
    return boxes[keep], scores[keep]


def draw(canvas: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray, spec) -> np.ndarray:
    """Skeletons, then their boxes on top (a box stays visible under a crowd of limbs), on a
    BGR image."""
    import cv2

    from kdray.vis import draw_pose
    for kp in keypoints:
        canvas = draw_pose(canvas, kp, spec, score_thr=0.0)  # SimCC scores are small
    for x, y, bw, bh in boxes:
        cv2.rectangle(canvas, (int(x), int(y)), (int(x + bw), int(y + bh)), BOX_BGR, 2)
    return canvas


def coco_results(image_path: str, keypoints: np.ndarray, boxes: np.ndarray,
                 box_scores: np.ndarray) -> list[dict]:
    """COCO keypoint results (kdray.eval.coco.to_coco_results' rescoring) plus each ``bbox``;
    ``image_id`` from a numeric file name (COCO's), else 0 with the name in ``file_name``."""
    from kdray.eval.coco import to_coco_results
    stem = Path(image_path).stem
    image_id = int(stem) if stem.isdigit() else 0
    out = to_coco_results([image_id] * len(keypoints), keypoints[..., :2], keypoints[..., 2],
                          box_scores)
    for r, box in zip(out, boxes):
        r["bbox"] = [float(v) for v in box]
        r["file_name"] = Path(image_path).name
    return out


def run_predict(args) -> dict:
    import cv2

    from kdray.data.coco import read_image
    from kdray.data.keypoints import spec_for
    from kdray.evaluate import load_model
    from kdray.inference import Predictor

    if not cv2.haveImageWriter(str(args.out)):  # before any compute: .txt, no extension, a dir
        raise InputError(f"--out {args.out}: OpenCV has no image writer for this file name; "
                         f"use an image extension such as .png or .jpg")
    canvas = read_image(args.image)  # BGR uint8; a clear error naming the file
    boxes, box_scores = person_boxes(args.boxes, args.image, canvas.shape, args.score_thr,
                                     args.nms_iou)  # validated before the model loads
    module, meta = load_model(args.model)
    keypoints = Predictor(module, meta)(cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB), boxes)
    canvas = draw(canvas, boxes, keypoints, spec_for(meta["dataset"]))
    _write(args.out, lambda p: cv2.imwrite(str(p), canvas), "--out")
    if args.json:
        text = json.dumps(coco_results(args.image, keypoints, boxes, box_scores))
        _write(args.json, lambda p: p.write_text(text), "--json")
    return {"out": str(args.out), "json": args.json or None, "persons": len(keypoints),
            "keypoints": np.round(keypoints, 2).tolist()}


def _write(path, writer, option: str) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ok = writer(path)
    except OSError as e:
        raise InputError(f"{option} {path}: cannot write it ({e.strerror})") from None
    if ok is False:  # cv2.imwrite says False, not an exception, for /proc/x.png
        raise InputError(f"{option} {path}: OpenCV could not write the image (is the folder "
                         f"writable?)")
