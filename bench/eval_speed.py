"""Evaluation speed: pycocotools OKS AP over N synthetic instances, SimCC decode + flip test.

Issue 9 (evaluation speed). Part 1 builds a COCO-format ground truth of ``--instances`` persons
(4 per image, 17 joints, random poses in random boxes, some joints unlabelled) and predictions
= GT + Gaussian noise, then times :func:`kdray.eval.coco.evaluate_coco` (what ``kdray eval``
and the validation hook run; ``--buckets`` adds the crowdIndex re-runs the SynthPose
evaluation does). Part 2 times the post-processing of a batch of SimCC logits, as evaluation
does it: argmax decode alone, and flip test (``flip_logits`` of a second set of logits,
average, decode) plus the map back to image pixels, in instances/s. Part 3 times the demo
student's forward with and without flip test (flip test doubles the forward).

    python bench/eval_speed.py                       # 6000 instances, ~30 s
    python bench/eval_speed.py --instances 20000 --buckets --repeats 3

Prints Markdown tables, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from kdray.codecs.simcc import SimCCCodec, flip_logits
from kdray.config import ModelConfig
from kdray.data.keypoints import COCO
from kdray.data.transforms import back_to_image
from kdray.eval.coco import evaluate_coco
from kdray.nn.pose_model import build_pose_model


def synthetic_coco(n: int, seed: int = 0, per_image: int = 4, noise: float = 4.0):
    """(GT dict, results list) of ``n`` persons; predictions are GT + N(0, noise) px."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    for i in range(int(np.ceil(n / per_image))):
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": 640, "height": 480,
                       "crowdIndex": float(rng.random())})
        for _ in range(min(per_image, n - len(anns))):
            w, h = rng.uniform(40, 200), rng.uniform(80, 400)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            kp = np.stack([x + w * rng.random(17), y + h * rng.random(17),
                           np.where(rng.random(17) < 0.8, 2, 0)], 1)
            kp[kp[:, 2] == 0, :2] = 0
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                         "keypoints": kp.ravel().round(2).tolist(),
                         "num_keypoints": int((kp[:, 2] > 0).sum())})
            pred = kp.copy()
            pred[:, :2] = np.where(kp[:, 2:] > 0, kp[:, :2], [x + w / 2, y + h / 2])
            pred[:, :2] += rng.normal(0, noise, (17, 2))
            pred[:, 2] = rng.uniform(0.3, 1.0, 17)
            results.append({"image_id": i + 1, "category_id": 1, "score": float(rng.random()),
                            "keypoints": pred.ravel().round(2).tolist()})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "person", "keypoints": list(COCO.joints),
                          "skeleton": [[a + 1, b + 1] for a, b in COCO.skeleton]}]}
    return gt, results


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls (after one warm-up call)."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=6000)
    ap.add_argument("--buckets", action="store_true", help="+ crowdIndex easy/medium/hard")
    ap.add_argument("--repeats", type=int, default=1, help="timed OKS evaluations")
    ap.add_argument("--sizes", default="256x192,96x64")
    ap.add_argument("--batch", type=int, default=256, help="decode batch")
    ap.add_argument("--student", default="mobilenetv3_small_100")
    args = ap.parse_args(argv)
    res: dict = {"bench": "eval_speed", "instances": args.instances,
                 "threads": torch.get_num_threads()}

    gt, results = synthetic_coco(args.instances)
    metrics: dict = {}

    def oks():
        metrics.update(evaluate_coco(gt, results, "coco", crowd_buckets=args.buckets))
    t = timed(oks, args.repeats)
    res["oks"] = {"seconds": t, "instances_per_s": args.instances / t, "AP": metrics["AP"]}
    print(f"\n| pycocotools OKS evaluation | instances | seconds | instances/s | AP |\n"
          f"|---|---|---|---|---|\n| COCO AP/AR{' + crowd buckets' if args.buckets else ''} "
          f"| {args.instances} | {t:.2f} | {args.instances / t:.0f} | {metrics['AP']:.1f} |")

    print(f"\n| post-processing, batch {args.batch} | crop | decode inst/s | "
          f"flip + decode + to image inst/s |\n|---|---|---|---|")
    flip = COCO.flip_index()
    res["decode"] = {}
    for text in args.sizes.split(","):
        h, w = (int(v) for v in text.split("x"))
        codec = SimCCCodec((h, w), 2.0)
        wx, hy = codec.bins
        lx, ly = torch.randn(args.batch, 17, wx), torch.randn(args.batch, 17, hy)
        fx, fy = torch.randn_like(lx), torch.randn_like(ly)
        center, scale = np.full((args.batch, 2), 200.0), np.full((args.batch, 2), 150.0)

        def flip_decode():
            gx, gy = flip_logits(fx, fy, flip, split_ratio=2.0)
            coords, _ = codec.decode((lx + gx) / 2, (ly + gy) / 2)
            back_to_image(coords.numpy(), center, scale, (h, w))
        d = args.batch / timed(lambda: codec.decode(lx, ly), 20)
        f = args.batch / timed(flip_decode, 20)
        res["decode"][text] = {"decode_per_s": d, "flip_decode_per_s": f}
        print(f"| SimCC k=2 | {text} | {d:.0f} | {f:.0f} |")

    size = (96, 64)
    model = build_pose_model(ModelConfig(backbone=args.student), SimCCCodec(size, 2.0),
                             flip).eval()
    x = torch.randn(64, 3, *size)
    with torch.no_grad():
        plain = 64 / timed(lambda: model(x), 5)
        both = 64 / timed(lambda: (model(x), model(x.flip(-1))), 5)
    res["forward"] = {"model": args.student, "size": list(size), "img_per_s": plain,
                      "flip_test_img_per_s": both, "ratio": both / plain}
    print(f"\n| inference forward ({args.student}, 96x64, batch 64) | img/s |\n|---|---|\n"
          f"| no flip | {plain:.0f} |\n| flip test | {both:.0f} ({both / plain:.2f}x) |")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
