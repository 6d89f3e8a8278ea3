"""SynthPose: the embedded, procedurally generated COCO-17 dataset (no download).

Each image holds 1-4 articulated figures (kdray/data/synth_figure.py) on a cluttered background,
some of them overlapping (CrowdPose-style crowd scenes) and some partly hidden by occluders.
Visibility follows COCO: v=0 outside the image, v=1 hidden (by another person, an occluder or the
figure's own body), v=2 seen. ``crowdIndex`` per image is CrowdPose's (Li et al., CVPR 2019,
section 3): the mean over persons of (other persons' keypoints inside its box) / (its own
keypoints), clipped to [0, 1].

Every image is drawn from its own generator ``default_rng([seed, split, index])`` so the bytes
written do not depend on the worker count, and the same seed gives byte-identical files.
Layout: out/train.json, out/val.json, out/images/{train,val}_XXXXXX.jpg, out/val_dets.json.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import cv2
import numpy as np

from kdray.data.keypoints import COCO
from kdray.data.synth_figure import (BACK_P, JOINT_PARTS, PART, SIDE_P, draw, extent, keypoints,
                                     sample_figure)

SPLITS = {"train": 0, "val": 1}
PERSONS_PER_IMAGE = (1, 2, 3, 4)
PERSONS_P = (.4, .3, .18, .12)
OCCLUDER = 255                         # label-map value of occluder pixels
OCCLUDER_P = .15                       # chance that an object hides part of a person
CROWD_P = .4                           # chance that a multi-person image is a crowd
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Difficulty:
    """How hard the scenes are. The defaults are the full SynthPose; the CPU demo uses an
    easier mix (configs/demo.yaml, README "Demo sizes")."""
    max_persons: int = 4          # persons per image: PERSONS_P over 1..max_persons, renormalised
    crowd_p: float = CROWD_P      # chance that a multi-person image is a crowd
    occluder_p: float = OCCLUDER_P  # chance that an object hides part of a person
    side_p: float = SIDE_P        # chance of any yaw (side views)
    back_p: float = BACK_P        # chance of a person turned away (the rest face the camera)

    def __post_init__(self):
        if not 1 <= self.max_persons <= len(PERSONS_PER_IMAGE):
            raise ValueError(f"max_persons must be 1..{len(PERSONS_PER_IMAGE)}")
        if self.side_p + self.back_p > 1:
            raise ValueError(f"side_p + back_p must be <= 1, got {self.side_p + self.back_p}")

    @classmethod
    def of(cls, settings) -> "Difficulty":
        """From any object carrying the same attribute names (data.synth, parsed CLI args)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


def person_counts(total: int, seed: int, split: int, max_persons: int = 4) -> list[int]:
    """Persons in each image of a split, summing exactly to ``total``."""
    rng, counts = np.random.default_rng([seed, split]), []
    sizes, p = PERSONS_PER_IMAGE[:max_persons], np.array(PERSONS_P[:max_persons])
    while sum(counts) < total:
        counts.append(min(int(rng.choice(sizes, p=p / p.sum())), total - sum(counts)))
    return counts


def _background(rng, H: int, W: int) -> np.ndarray:
    """Gradient, optional floor, 6-18 random shapes (some limb-like bars), softly blurred."""
    c0, c1 = rng.integers(30, 230, 3), rng.integers(30, 230, 3)
    t = np.linspace(0, 1, H if rng.random() < .6 else W)[:, None]
    ramp = c0 * (1 - t) + c1 * t
    img = np.ascontiguousarray(np.broadcast_to(ramp[:, None] if len(t) == H else ramp[None],
                                               (H, W, 3))).astype(np.uint8)
    if rng.random() < .5:
        img[int(H * rng.uniform(.4, .8)):] = rng.integers(30, 230, 3)
    for _ in range(rng.integers(6, 19)):
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        s = int(rng.integers(6, max(7, min(H, W) // 3)))
        kind = rng.integers(4)
        if kind == 0:
            cv2.rectangle(img, (x, y), (x + s, y + int(s * rng.uniform(.3, 2))), col, -1)
        elif kind == 1:
            cv2.circle(img, (x, y), s // 2, col, -1, cv2.LINE_AA)
        elif kind == 2:
            a = rng.uniform(0, np.pi)
            cv2.line(img, (x, y), (int(x + 2 * s * np.cos(a)), int(y + 2 * s * np.sin(a))), col,
                     int(rng.integers(2, 9)), cv2.LINE_AA)
        else:
            pts = np.array([x, y]) + rng.integers(-s, s + 1, (int(rng.integers(3, 6)), 2))
            cv2.fillPoly(img, [pts.astype(np.int32)], col, cv2.LINE_AA)
    return cv2.GaussianBlur(img, (0, 0), float(rng.uniform(.6, 1.5)))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _layout(rng, n: int, H: int, W: int, crowd: bool, shrink: float = 1.0,
            hard: Difficulty = Difficulty()) -> list:
    """Place n figures (fewer when no room is found): apart (box IoU <= .05) or, for crowds,
    each beside the previous one and overlapping it (.1 <= IoU <= .7). ``shrink`` < 1 (the
    fallback) makes them smaller and only keeps IoU <= .7. Boxes stay in the image except, for
    one figure in five, up to 20 % of the box (truncated persons: their v=0 keypoints)."""
    hmax = min(200.0, .85 * H) * shrink
    base = rng.uniform(60, max(61.0, hmax))
    figs, boxes = [], []
    tight = rng.uniform(.2, .7) if n < 3 else rng.uniform(.45, .75)   # crowd spacing
    for i in range(n):
        for t in range(60):
            h = max(55.0, (base * rng.uniform(.85, 1.15) if crowd else rng.uniform(60, hmax))
                    * .93 ** (t // 6))
            f = sample_figure(rng, 0, 0, h, hard.side_p, hard.back_p)
            e = extent(f)
            bw, bh = e[2] - e[0], e[3] - e[1]
            slack = .2 * np.array([bw, bh]) if rng.random() < .2 else np.zeros(2)
            if crowd and i:
                a = boxes[i - 1]                           # beside the last one, overlapping
                dx = rng.choice((-1, 1)) * rng.uniform(tight, tight + .35) * (a[2] - a[0] + bw) / 2
                ctr = (a[:2] + a[2:]) / 2 + [dx, rng.normal(0, .08 * bh)]
                x, y = ctr - (e[:2] + e[2:]) / 2
            else:
                lo, hi = -e[:2] - slack, np.array([W, H]) - e[2:] + slack
                if (hi < lo).any():
                    continue
                x, y = rng.uniform(lo, hi)
            box = e + [x, y, x, y]
            if box[0] < -slack[0] - 1 or box[1] < -slack[1] - 1 or box[2] > W + slack[0] + 1 \
                    or box[3] > H + slack[1] + 1:
                continue
            ious = [_iou(box, b) for b in boxes]
            if ious and max(ious) > (.7 if crowd or shrink < 1 else .05):
                continue
            if crowd and ious and max(ious) < .1 and shrink == 1:
                continue
            figs.append(replace(f, cx=f.cx + x, cy=f.cy + y))
            boxes.append(box)
            break
        else:
            break                                       # no room: the caller tries again
    return figs


def _occluder(rng, img: np.ndarray, labels: np.ndarray, box: np.ndarray, kp: np.ndarray) -> None:
    """An object in front of one person: a bar over the legs, a post, or a blob on a joint."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    col = tuple(int(c) for c in rng.integers(0, 256, 3))
    mask = np.zeros(labels.shape, np.uint8)
    kind = rng.integers(3)
    if kind == 0:
        y0 = box[1] + bh * rng.uniform(.5, .8)
        x0 = box[0] + bw * rng.uniform(-.4, .3)
        cv2.rectangle(mask, (int(x0), int(y0)), (int(x0 + bw * rng.uniform(.7, 1.4)),
                                                  int(box[3] + bh * .2)), 1, -1)
    elif kind == 1:
        x0 = box[0] + bw * rng.uniform(0, .8)
        cv2.rectangle(mask, (int(x0), int(box[1] - bh * .2)),
                      (int(x0 + bw * rng.uniform(.12, .3)), int(box[3] + bh * .2)), 1, -1)
    else:
        c = kp[rng.integers(5, 17)] + rng.normal(0, .04 * bh, 2)
        ax = (int(bh * rng.uniform(.07, .16)), int(bh * rng.uniform(.07, .16)))
        cv2.ellipse(mask, (int(c[0]), int(c[1])), ax, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    over = np.empty_like(img)
    over[:] = col
    if rng.random() < .5:                               # striped / checked texture
        step = int(rng.integers(3, 8))
        over[::step * 2] = tuple(int(c * .6) for c in col)
        if rng.random() < .5:
            over[:, ::step * 2] = tuple(int(c * .6) for c in col)
    m = mask > 0
    img[m], labels[m] = over[m], OCCLUDER


def _render(rng, n: int, H: int, W: int, hard: Difficulty = Difficulty()):
    """Draw one scene: returns the BGR image, the figures (far to near) and their (17, 3)
    keypoints with v. Layouts where someone has < 8 labelled or < 5 visible joints are redrawn
    (crowds 8 times, then small spread-out figures; the 10th try is kept whatever it is)."""
    bg = _background(rng, H, W)
    for attempt in range(10):
        crowd = n > 1 and attempt < 8 and rng.random() < hard.crowd_p
        figs = _layout(rng, n, H, W, crowd, 1.0 if attempt < 8 else .6, hard)
        if len(figs) < n:
            continue
        figs.sort(key=lambda f: extent(f)[3] + rng.normal(0, .05 * f.height))
        img, labels = bg.copy(), np.zeros((H, W), np.uint8)
        for p, f in enumerate(figs):
            draw(f, img, labels, 16 * p)
        kps = [keypoints(f) for f in figs]
        for p, f in enumerate(figs):
            if rng.random() < hard.occluder_p:
                _occluder(rng, img, labels, extent(f), kps[p][0])
        vis = [_visibility(labels, p, kp, front) for p, (kp, front) in enumerate(kps)]
        if attempt == 9 or all((v > 0).sum() >= 8 and (v == 2).sum() >= 5 for v in vis):
            return img, figs, [np.column_stack([k[0], v]) for k, v in zip(kps, vis)]
    raise RuntimeError("SynthPose layout failed")  # unreachable: attempt 9 always returns


def _visibility(labels: np.ndarray, p: int, kp: np.ndarray, front: np.ndarray) -> np.ndarray:
    """COCO v per joint: 0 outside the image or a face point on the far side of the head (as
    COCO leaves the face of a person seen from behind unlabelled); 2 if the pixel under the
    joint shows one of the joint's own parts; else 1 (hidden by someone, something, or the
    person's own body)."""
    H, W = labels.shape
    v = np.zeros(len(kp), np.float32)
    for j, (x, y) in enumerate(kp):
        if 0 <= x < W and 0 <= y < H and front[j]:
            own = {16 * p + PART[name] + 1 for name in JOINT_PARTS[j]}
            v[j] = 2 if labels[int(y), int(x)] in own else 1
    return v


def crowd_index(boxes: list, kps: list) -> float:
    """CrowdPose crowd index: mean over persons of N_b / N_a, N_a = own labelled keypoints,
    N_b = other persons' labelled keypoints inside this person's box (xywh); clipped to 1."""
    ratios = []
    for i, (b, k) in enumerate(zip(boxes, kps)):
        n_a = int((k[:, 2] > 0).sum())
        if n_a == 0:
            continue
        n_b = sum(int(((o[:, 2] > 0) & (o[:, 0] >= b[0]) & (o[:, 0] <= b[0] + b[2])
                       & (o[:, 1] >= b[1]) & (o[:, 1] <= b[1] + b[3])).sum())
                  for j, o in enumerate(kps) if j != i)
        ratios.append(n_b / n_a)
    return float(min(1.0, np.mean(ratios))) if ratios else 0.0


def _r(x, nd: int = 2) -> list:
    return [round(float(v), nd) for v in np.ravel(x)]


def _image_job(args: tuple) -> tuple[dict, list, list]:
    """Draw, write and annotate image ``index`` of ``split`` (runs in a worker process)."""
    out, split, index, n, seed, hard = args
    cv2.setNumThreads(1)
    rng = np.random.default_rng([seed, SPLITS[split], index])
    H = int(rng.integers(11, 17)) * 16                      # 176..256; wider for more people
    W = min(256, 160 + 32 * (n - 1) + int(rng.integers(0, 4)) * 16)
    img, figs, kps = _render(rng, n, H, W, hard)
    if rng.random() < .3:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(.4, .8)))
    noise = rng.standard_normal(img.shape, np.float32) * np.float32(rng.uniform(0, 6))
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    name = f"{split}_{index:06d}.jpg"
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {name}")
    (Path(out) / "images" / name).write_bytes(buf.tobytes())
    image_id = SPLITS[split] * 1_000_000 + index + 1
    anns, boxes = [], []
    for p, (f, kp) in enumerate(zip(figs, kps)):
        mask = np.zeros((H, W), np.uint8)
        draw(f, None, mask)                                  # the person alone: amodal silhouette
        ys, xs = np.nonzero(mask)
        if not xs.size:                                      # cannot happen with the layout
            ys, xs = kp[kp[:, 2] > 0, 1].astype(int), kp[kp[:, 2] > 0, 0].astype(int)
        x0, y0 = max(xs.min() - 2, 0), max(ys.min() - 2, 0)
        x1, y1 = min(xs.max() + 3, W), min(ys.max() + 3, H)
        boxes.append(np.array([x0, y0, x1 - x0, y1 - y0], np.float64))
        kp = kp.copy()
        kp[kp[:, 2] == 0] = 0                                # COCO: unlabelled -> (0, 0, 0)
        anns.append({"id": image_id * 10 + p, "image_id": image_id, "category_id": 1,
                     "bbox": _r(boxes[-1]), "area": float(len(xs)), "iscrowd": 0,
                     "num_keypoints": int((kp[:, 2] > 0).sum()),
                     "keypoints": [round(float(v), 2) if i % 3 < 2 else int(v)
                                   for i, v in enumerate(kp.ravel())]})
    kps = [np.array(a["keypoints"], np.float64).reshape(-1, 3) for a in anns]
    image = {"id": image_id, "file_name": name, "width": W, "height": H,
             "crowdIndex": round(crowd_index(boxes, kps), 3)}
    return image, anns, _detections(rng, image_id, boxes, H, W)


def _detections(rng, image_id: int, boxes: list, H: int, W: int) -> list[dict]:
    """Detector-style boxes: every GT box jittered (score falls with the error) plus, in some
    images, a low-scoring false positive."""
    dets = []
    for b in boxes:
        c = b[:2] + b[2:] / 2 + rng.normal(0, .04, 2) * b[2:]
        wh = b[2:] * np.exp(rng.normal(0, .07, 2))
        x0, y0 = np.clip(c - wh / 2, 0, [W, H])
        x1, y1 = np.clip(c + wh / 2, 0, [W, H])
        jb = np.array([x0, y0, x1, y1])
        score = 1 - .6 * (1 - _iou(jb, np.r_[b[:2], b[:2] + b[2:]])) - rng.uniform(0, .12)
        dets.append({"image_id": image_id, "category_id": 1, "bbox": _r([x0, y0, x1 - x0, y1 - y0]),
                     "score": round(float(np.clip(score, .3, .999)), 4)})
    if rng.random() < .15:
        w, h = rng.uniform(15, 60), rng.uniform(30, 120)
        x, y = rng.uniform(0, max(1, W - w)), rng.uniform(0, max(1, H - h))
        dets.append({"image_id": image_id, "category_id": 1, "bbox": _r([x, y, w, h]),
                     "score": round(float(rng.uniform(.02, .3)), 4)})
    return dets


def _dump(obj, path: Path) -> None:
    """Canonical JSON (sorted keys, no spaces), written atomically: readers never see half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")))
    tmp.replace(path)


def generate(out_dir: str | Path, train: int = 4000, val: int = 500, seed: int = 0,
             workers: int = 2, progress: bool = True, hard: Difficulty = Difficulty()) -> dict:
    """Write SynthPose (``train``/``val`` are PERSON counts) in COCO format under ``out_dir``.
    Each file's ``info`` records the settings (:func:`check_generated` compares them).

    Returns the paths written ("train", "val", "val_dets", "images") and the counts
    ("train_images", "train_persons", "val_images", "val_persons"). train.json is written last,
    so its presence means the set is complete. Workers are spawned processes (safe beside torch
    threads; a script calling this needs the usual ``if __name__ == "__main__"`` guard)."""
    from tqdm import tqdm
    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), split, i, n, seed, hard)
            for split, total in (("train", train), ("val", val))
            for i, n in enumerate(person_counts(total, seed, SPLITS[split], hard.max_persons))]
    # disable=None: tqdm draws on a terminal only (a log file gets no carriage-return spam).
    bar = dict(total=len(jobs), disable=None if progress else True, desc="SynthPose",
               unit="img", file=sys.stderr)
    if workers > 1 and not mp.current_process().daemon:   # daemons may not have children
        with mp.get_context("spawn").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_image_job, jobs, chunksize=8), **bar))
    else:
        results = [_image_job(j) for j in tqdm(jobs, **bar)]
    category = {"id": 1, "name": "person", "supercategory": "person",
                "keypoints": list(COCO.joints),
                "skeleton": [[a + 1, b + 1] for a, b in COCO.skeleton]}
    info: dict = {"images": str(out / "images")}
    for split in ("val", "train"):
        rs = [r for r, job in zip(results, jobs) if job[1] == split]
        for old in (out / "images").glob(f"{split}_*.jpg"):   # leftovers of a larger run
            if int(old.stem.split("_")[1]) >= len(rs):
                old.unlink(missing_ok=True)
        coco = {"info": {"description": f"SynthPose {split}", "seed": seed,
                         "persons": train if split == "train" else val, **asdict(hard)},
                "images": [r[0] for r in rs], "annotations": [a for r in rs for a in r[1]],
                "categories": [category]}
        if split == "val":
            _dump([d for r in rs for d in r[2]], out / "val_dets.json")
            info["val_dets"] = str(out / "val_dets.json")
        _dump(coco, out / f"{split}.json")
        info[split] = str(out / f"{split}.json")
        info[f"{split}_images"], info[f"{split}_persons"] = len(rs), len(coco["annotations"])
    return info


def check_generated(out_dir: str | Path, train: int, val: int, seed: int,
                    hard: Difficulty = Difficulty()) -> None:
    """Raise DataError (naming the file and the setting) when the SynthPose under ``out_dir``
    was generated with other settings than asked: a config change must not train silently on
    the old images. Files from before settings were recorded count as the defaults."""
    from kdray.data.coco import fail
    for split, persons in (("train", train), ("val", val)):
        path = Path(out_dir) / f"{split}.json"
        data = _read_split(path)
        info = {**asdict(Difficulty()), **data.get("info", {}),   # unrecorded: the defaults
                "persons": len(data["annotations"])}
        for key, value in {"seed": seed, "persons": persons, **asdict(hard)}.items():
            if info.get(key) != value:
                raise fail(path, "info", key, f"generated with {info.get(key)!r}, the config "
                           f"asks for {value!r} (data.synth); use another data.root or delete "
                           f"{out_dir}")


def _read_split(path: Path) -> dict:
    """A generated split file; truncated (a killed generation) or edited by hand, it is a
    DataError naming it, with the fix."""
    from kdray.data.coco import DataError, fail, load_json
    try:
        data = load_json(path)   # truncated JSON: "invalid JSON", naming the file
    except DataError as e:
        raise DataError(f"{e}; delete {path.parent} to generate SynthPose again") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) \
            or not isinstance(data.get("info", {}), dict):
        raise fail(path, "top level", "annotations", "not a SynthPose annotation file; delete "
                   f"{path.parent} to generate it again")
    return data


def _spread(x) -> dict:
    x = np.asarray(x, np.float64)
    return {"mean": round(float(x.mean()), 3), "min": round(float(x.min()), 3),
            "max": round(float(x.max()), 3)} if x.size else {}


def dataset_stats(out_dir: str | Path) -> dict:
    """Per split: images, persons, persons per image, keypoint visibility fractions (of all
    17 x persons slots), crowdIndex spread and CrowdPose image buckets (easy < .2 <= medium <
    .8 <= hard), box heights, areas with COCO's size ranges (APM/APL use them), image sizes."""
    stats = {}
    for split in SPLITS:
        path = Path(out_dir) / f"{split}.json"
        if not path.exists():
            continue
        d = _read_split(path)
        counts: dict[int, int] = {im["id"]: 0 for im in d["images"]}
        for a in d["annotations"]:
            counts[a["image_id"]] += 1
        v = np.array([a["keypoints"][2::3] for a in d["annotations"]]).ravel()
        ci = np.array([im.get("crowdIndex", 0.0) for im in d["images"]])
        area = np.array([a["area"] for a in d["annotations"]], np.float64)
        stats[split] = {
            "images": len(d["images"]), "persons": len(d["annotations"]),
            "persons_per_image": _spread(list(counts.values())),
            "keypoints": {"visible_v2": round(float((v == 2).mean()), 3),
                          "occluded_v1": round(float((v == 1).mean()), 3),
                          "unlabelled_v0": round(float((v == 0).mean()), 3),
                          "occluded_of_labelled":
                              round(float((v == 1).sum() / max(1, (v > 0).sum())), 3)},
            "crowd_index": {**_spread(ci), "easy_lt_0.2": int((ci < .2).sum()),
                            "medium_lt_0.8": int(((ci >= .2) & (ci < .8)).sum()),
                            "hard_ge_0.8": int((ci >= .8).sum())},
            "box_height": _spread([a["bbox"][3] for a in d["annotations"]]),
            "area": {**_spread(area), "small_lt_32sq": int((area < 32 ** 2).sum()),
                     "medium": int(((area >= 32 ** 2) & (area <= 96 ** 2)).sum()),
                     "large_gt_96sq": int((area > 96 ** 2).sum())},
            "image_height": _spread([im["height"] for im in d["images"]]),
            "image_width": _spread([im["width"] for im in d["images"]]),
        }
    return stats
