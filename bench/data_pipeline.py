"""Training crops per second of ONE loader worker: JPEG decode + affine warp + SimCC targets.

Runs PoseDataset (train mode, full augmentation) in the main thread with OpenCV and torch
limited to one thread, i.e. what each DataLoader worker does; multiply by the worker count for
a loader's ceiling. Also times the decode alone, to show where the time goes.

    python bench/data_pipeline.py                                   # real COCO sample
    python bench/data_pipeline.py --ann data/synthpose/train.json --images data/synthpose/images
    python bench/data_pipeline.py --sizes 256x192,96x64 --low 64x48 --seconds 10

Prints a Markdown table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import cv2
import torch

from kdray.config import DataConfig
from kdray.data.coco import load_coco, read_image
from kdray.data.dataset import PoseDataset

REAL_COCO = Path(__file__).resolve().parents[1].parent / "shared/data/real/coco"


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def timed(fn, seconds: float, min_iters: int = 20) -> tuple[int, float]:
    """Call fn(i) until ``seconds`` have passed (and at least min_iters times) -> (n, elapsed)."""
    fn(0)  # warm-up: first imread/warp pays one-off allocation costs
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < seconds:
        fn(n)
        n += 1
    return n, time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ann", default=str(REAL_COCO / "test_coco.json"))
    ap.add_argument("--images", default=None, help="image folder (default: the --ann folder)")
    ap.add_argument("--sizes", default="256x192,96x64", help="HxW crop sizes, comma separated")
    ap.add_argument("--low", default="", help="optional HxW low-res view (CDKD), e.g. 64x48")
    ap.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    ap.add_argument("--max-records", type=int, default=2000)
    args = ap.parse_args(argv)

    cv2.setNumThreads(1)       # as in a DataLoader worker (seed_worker)
    torch.set_num_threads(1)
    images = args.images or str(Path(args.ann).parent)
    records, spec = load_coco(args.ann, images)
    records = records[: args.max_records]
    paths = [r.image_path for r in records]
    low = parse_size(args.low) if args.low else None

    n, t = timed(lambda i: read_image(paths[i % len(paths)]), args.seconds)
    rows = [{"stage": "decode only (cv2.imread)", "size": "-", "per_s": n / t, "ms": 1e3 * t / n}]
    for text in args.sizes.split(","):
        size = parse_size(text)
        ds = PoseDataset(records, spec, DataConfig(), train=True, input_size=size,
                         low_res_size=low)
        n, t = timed(lambda i: ds[(i % len(ds), i)], args.seconds)
        label = f"{size[0]}x{size[1]}" + (f" + {low[0]}x{low[1]}" if low else "")
        rows.append({"stage": "train item (decode+warp+targets)", "size": label,
                     "per_s": n / t, "ms": 1e3 * t / n})

    print(f"\nOne loader worker, {len(records)} persons from {args.ann} "
          f"({platform.processor() or platform.machine()}, cv2 {cv2.__version__}, 1 thread)\n")
    print("| stage | crop size | items/s | ms/item |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['size']} | {r['per_s']:.1f} | {r['ms']:.2f} |")
    result = {"bench": "data_pipeline", "ann": args.ann, "records": len(records),
              "seconds": args.seconds,
              "items_per_s": {r["size"] if r["size"] != "-" else "decode": round(r["per_s"], 1)
                              for r in rows}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
