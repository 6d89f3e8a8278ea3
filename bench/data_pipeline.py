"""Training crops per second of ONE loader worker: JPEG decode + warp vs pre-warped shards.

Issue 9 (data path). Runs PoseDataset (JPEG path) and ShardDataset (kdray/data/shards.py) in
train mode with the config's augmentation, in the main thread with OpenCV and torch limited to
one thread, i.e. what each DataLoader worker does. The two paths alternate ``--repeats`` times
and each cell is the median, so the ratio is measured in one run on a machine shared with other
jobs. Then the loader (``data.num_workers`` workers, shard path) against training: loader
crops/s over training images/s of the config's teacher and student (fp32 + channels_last, the
CPU ``auto``; the slower model is what the loader has to feed, the faster the harder case).

    python bench/data_pipeline.py                                   # real COCO sample
    python bench/data_pipeline.py --ann data/synthpose/train.json --config configs/demo.yaml \
        --sizes 96x64                                               # the demo
    python bench/data_pipeline.py --sizes 256x192,96x64 --low 64x48 --seconds 5 --repeats 5

Prints Markdown tables, then one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hrnet_w32_step import images_per_second, make_step  # noqa: E402

from kdray.config import ExperimentConfig, load_config  # noqa: E402
from kdray.data.coco import load_coco, read_image  # noqa: E402
from kdray.data.dataset import PoseDataset, make_loader  # noqa: E402
from kdray.data.shards import ShardDataset, build_shards  # noqa: E402

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


def rate(ds, seconds: float, offset: int) -> float:
    n, t = timed(lambda i: ds[((i + offset) % len(ds), i + offset)], seconds)
    return n / t


def loader_rate(ds, batch: int, workers: int, seconds: float) -> float:
    """Crops/s out of a DataLoader (after its first batch: worker start-up left out)."""
    loader = make_loader(ds, batch, True, workers, seed=0)
    n, t0 = 0, None
    while t0 is None or time.perf_counter() - t0 < seconds:
        for b in loader:
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += len(b["image"])
            if time.perf_counter() - t0 >= seconds:
                break
    return n / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ann", default=str(REAL_COCO / "test_coco.json"))
    ap.add_argument("--images", default=None, help="image folder (default: <ann folder>/images or the --ann folder)")
    ap.add_argument("--config", default=None, help="augmentation, models, num_workers "
                    "(default: kdray defaults)")
    ap.add_argument("--sizes", default="256x192,96x64", help="HxW crop sizes, comma separated")
    ap.add_argument("--low", default="", help="optional HxW low-res view (CDKD), e.g. 64x48")
    ap.add_argument("--codec", default="raw", choices=("raw", "jpeg"))
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="alternations of the two paths")
    ap.add_argument("--max-records", type=int, default=1000)
    ap.add_argument("--no-train", action="store_true", help="skip loader-vs-training")
    args = ap.parse_args(argv)

    cfg = load_config(args.config) if args.config else ExperimentConfig()
    cv2.setNumThreads(1)       # as in a DataLoader worker
    torch.set_num_threads(1)
    ann_dir = Path(args.ann).parent
    images = args.images or str(ann_dir / "images" if (ann_dir / "images").is_dir() else ann_dir)
    records, spec = load_coco(args.ann, images)
    records = records[: args.max_records]
    low = parse_size(args.low) if args.low else None
    tmp = Path(tempfile.mkdtemp(prefix="kdray-bench-shards-"))

    paths = [r.image_path for r in records]
    n, t = timed(lambda i: read_image(paths[i % len(paths)]), args.seconds)
    rows = [{"size": "decode only (cv2.imread)", "jpeg": n / t}]
    for text in args.sizes.split(","):
        size = parse_size(text)
        data = dataclasses.replace(cfg.data, input_size=size, shard_codec=args.codec)
        t0 = time.perf_counter()
        path = build_shards(records, spec, data, tmp / text)
        build_s = time.perf_counter() - t0
        jpeg = PoseDataset(records, spec, data, train=True, low_res_size=low)
        shard = ShardDataset(path, spec, data, train=True, low_res_size=low)
        r = {"jpeg": [], "shard": []}
        for rep in range(args.repeats):
            r["jpeg"].append(rate(jpeg, args.seconds, rep * 997))
            r["shard"].append(rate(shard, args.seconds, rep * 997))
        mb = sum(f.stat().st_size for f in path.glob("*.parquet")) / 2**20
        rows.append({"size": text + (f" + {args.low}" if low else ""),
                     "jpeg": statistics.median(r["jpeg"]), "shard": statistics.median(r["shard"]),
                     "ratio": statistics.median(s / j for s, j in zip(r["shard"], r["jpeg"])),
                     "build_s": build_s, "shard_mb": mb, "ds": shard})

    print(f"\nOne loader worker, {len(records)} persons from {args.ann}, codec {args.codec}, "
          f"median of {args.repeats} x {args.seconds:.0f} s, 1 thread (cv2 {cv2.__version__})\n")
    print("| crop size | JPEG path crops/s | shard crops/s | shard / JPEG | build s | shards MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "shard" not in r:
            print(f"| {r['size']} | {r['jpeg']:.0f} | | | | |")
            continue
        print(f"| {r['size']} | {r['jpeg']:.0f} | {r['shard']:.0f} | {r['ratio']:.2f}x | "
              f"{r['build_s']:.1f} | {r['shard_mb']:.1f} |")
    result = {"bench": "data_pipeline", "ann": args.ann, "records": len(records),
              "codec": args.codec, "crops_per_s": {r["size"]: {k: round(r[k], 1) for k in
                                                             ("jpeg", "shard", "ratio") if k in r}
                                                   for r in rows}}
    if not args.no_train:
        result["loader_vs_train"] = loader_vs_train(args, cfg, rows[1])
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    return result


def loader_vs_train(args, cfg, row: dict) -> dict:
    """Loader crops/s (shards, cfg workers) / training images/s, per model, at the first size."""
    size, ds = parse_size(row["size"].split(" ")[0]), row["ds"]
    workers, batch = cfg.data.num_workers, cfg.student.train.batch_size
    torch.set_num_threads(2)
    loader = statistics.median(loader_rate(ds, batch, workers, args.seconds * 2)
                               for _ in range(args.repeats))
    out = {"size": row["size"], "loader_workers": workers, "loader_crops_per_s": round(loader, 1)}
    print(f"\nLoader ({workers} worker(s), shards, batch {batch}) vs one training step "
          f"(fp32 + channels_last, {torch.get_num_threads()} threads), {row['size']}\n")
    print("| model | training img/s | loader crops/s | loader / training |")
    print("|---|---|---|---|")
    for role, model in (("teacher", cfg.teacher.model), ("student", cfg.student.model)):
        step, _ = make_step(model.backbone, size, batch, bf16=False, channels_last=True)
        train = statistics.median(images_per_second(step, batch, args.seconds)
                                  for _ in range(args.repeats))
        out[role] = {"backbone": model.backbone, "train_img_per_s": round(train, 1),
                     "loader_over_train": round(loader / train, 2)}
        print(f"| {role} {model.backbone} | {train:.0f} | {loader:.0f} | {loader / train:.1f}x |")
    return out


if __name__ == "__main__":
    main()
