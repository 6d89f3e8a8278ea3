"""CPU/GPU fast paths per demo model: training images/s of fp32, channels_last, bf16 autocast,
bf16 + channels_last (and torch.compile) as ratios over fp32 measured in one run.

Issue 9 (fast paths). One training step = forward + SimCC L_KL (logits in fp32, as the tasks
compute it) + backward + Adam, on random inputs at the config's input size and batch. The
variants take turns one step at a time (``--rounds``); each ratio is fp32's median step time over
the variant's, so a machine shared with other jobs biases all cells alike.
``--accuracy-steps N`` then trains fp32 and a variant from the same initial weights on the same
SynthPose batches (the demo's data and augmentation) and compares the losses.

    python bench/fast_paths.py                                  # configs/demo.yaml, ~2 min
    python bench/fast_paths.py --compile                        # + torch.compile (slow to build)
    python bench/fast_paths.py --models hrnet_w18_small --no-speed --accuracy-steps 200 \
        --accuracy-variant bf16+cl
    python bench/fast_paths.py --no-speed --fit-epochs 3      # the real teacher stage, val AP

Prints Markdown tables, then one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from kdray.codecs.simcc import SimCCCodec
from kdray.config import ModelConfig, load_config
from kdray.data.keypoints import COCO
from kdray.losses.simcc import simcc_kl_loss
from kdray.nn.pose_model import build_pose_model

VARIANTS = {"fp32": (False, False, False), "cl": (False, True, False),
            "bf16": (True, False, False), "bf16+cl": (True, True, False)}
COMPILED = {"cl+compile": (False, True, True), "bf16+cl+compile": (True, True, True)}


def build(backbone: str, size, k: float, channels_last: bool, compile_: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = build_pose_model(ModelConfig(backbone=backbone), SimCCCodec(tuple(size), k),
                             COCO.flip_index()).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return (torch.compile(model) if compile_ else model), opt


def train_step(model, opt, bf16: bool, channels_last: bool, images, tx, ty, weight) -> float:
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    ctx = (torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16
           else contextlib.nullcontext())
    with ctx:
        out = model(images)
    loss = simcc_kl_loss(out["logits_x"].float(), out["logits_y"].float(), tx, ty, weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def random_step(backbone, size, batch, k, bf16, cl, compile_):
    model, opt = build(backbone, size, k, cl, compile_)
    bins = (int(size[1] * k), int(size[0] * k))
    images = torch.randn(batch, 3, *size)
    tx = torch.softmax(torch.randn(batch, 17, bins[0]), -1)
    ty = torch.softmax(torch.randn(batch, 17, bins[1]), -1)
    weight = torch.ones(batch, 17)
    return lambda: train_step(model, opt, bf16, cl, images, tx, ty, weight)


def speed(backbone, size, batch, k, variants, args) -> dict:
    """Round-robin: each round times ONE step of every variant, so a burst of another job's
    load hits neighbouring cells alike; per variant the median step time over the rounds."""
    steps = {name: random_step(backbone, size, batch, k, *v) for name, v in variants.items()}
    for step in steps.values():   # warm-up: oneDNN builds kernels per shape; compile traces
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["fp32"])
    return {n: {"img_per_s": batch / statistics.median(v),
                "ratio": base / statistics.median(v)} for n, v in times.items()}


def accuracy(backbone, cfg, variant: str, steps: int) -> dict:
    """Mean L_KL over the first and last 20% of ``steps`` real SynthPose batches, fp32 vs
    ``variant``, same initial weights and batches."""
    from kdray.data.dataset import PoseDataset, make_loader, normalize
    from kdray.stage_run import load_records
    train, _, spec = load_records(cfg)
    ds = PoseDataset(train, spec, cfg.data, train=True)
    t = cfg.teacher.train
    out = {}
    for name in ("fp32", variant):
        bf16, cl, comp = {**VARIANTS, **COMPILED}[name]
        model, opt = build(backbone, cfg.data.input_size, cfg.data.split_ratio, cl, comp, seed=1)
        for g in opt.param_groups:
            g["lr"] = t.lr
        loader = make_loader(ds, t.batch_size, True, cfg.data.num_workers, seed=0)
        losses = []
        while len(losses) < steps:
            for b in loader:
                images = normalize(b["image"])
                losses.append(train_step(model, opt, bf16, cl, images, b["target_x"],
                                         b["target_y"], b["target_weight"]))
                if len(losses) >= steps:
                    break
        n = max(1, steps // 5)
        out[name] = {"first": statistics.mean(losses[:n]), "last": statistics.mean(losses[-n:])}
    out["last_ratio"] = out[variant]["last"] / out["fp32"]["last"]
    return out


def accuracy_fit(cfg, precision: str, epochs: int, persons: int) -> dict:
    """The real teacher stage (kdray.stages + kdray.train.fit, loss under autocast as in
    training, warm-up, clipping, evaluation) with ``precision``: losses per epoch and val AP."""
    import os
    import shutil
    import tempfile

    from kdray.config import with_overrides
    from kdray.stage_run import run_stage
    os.environ.setdefault("KDRAY_PROGRESS", "0")
    c = with_overrides(cfg, {"teacher.train.precision": precision,
                             "teacher.train.epochs": epochs, "teacher.train.eval_every": epochs,
                             "data.max_train": persons})
    out = tempfile.mkdtemp(prefix=f"kdray-acc-{precision}-")
    res = run_stage("teacher", c, out)
    shutil.rmtree(out, ignore_errors=True)
    return {"loss": [round(h["loss"], 4) for h in res.history],
            "throughput": [round(h["throughput"], 1) for h in res.history],
            "val_AP": res.metrics.get("val_AP")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--models", default="", help="backbones, comma separated (default: the "
                    "config's teacher and student)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile variants")
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = default")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--accuracy-steps", type=int, default=0, help="e.g. 200; 0 = skip")
    ap.add_argument("--accuracy-variant", default="fastest",
                    help="variant compared with fp32 (default: the fastest measured)")
    ap.add_argument("--fit-epochs", type=int, default=0, help="also train the config's teacher "
                    "stage fp32 vs bf16 with kdray's fit for this many epochs (val AP)")
    ap.add_argument("--fit-persons", type=int, default=0, help="with --fit-epochs: persons/epoch")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    size, k = tuple(cfg.data.input_size), cfg.data.split_ratio
    models = args.models.split(",") if args.models else [cfg.teacher.model.backbone,
                                                         cfg.student.model.backbone]
    variants = {**VARIANTS, **(COMPILED if args.compile else {})}
    batch = cfg.teacher.train.batch_size
    result = {"bench": "fast_paths", "config": args.config, "threads": torch.get_num_threads(),
              "size": list(size), "batch": batch, "models": {}}
    if not args.no_speed:
        print(f"\nTraining img/s, {size[0]}x{size[1]}, batch {batch}, "
              f"{torch.get_num_threads()} threads, median step time of {args.rounds} round-robin "
              f"rounds; ratio over fp32 of the same run\n")
        print("| model | " + " | ".join(variants) + " | fastest |")
        print("|---|" + "---|" * (len(variants) + 1))
    for backbone in models:
        res = {} if args.no_speed else speed(backbone, size, batch, k, variants, args)
        entry = {"speed": res}
        if res:
            best = max(res, key=lambda n: res[n]["ratio"])
            entry["fastest"] = best
            print(f"| {backbone} | " + " | ".join(
                f"{res[n]['img_per_s']:.0f} ({res[n]['ratio']:.2f}x)" for n in variants)
                + f" | {best} |", flush=True)
        if args.accuracy_steps:
            v = args.accuracy_variant if args.accuracy_variant != "fastest" else entry.get(
                "fastest", "bf16+cl")
            if v == "fp32":
                v = "cl"
            entry["accuracy"] = accuracy(backbone, cfg, v, args.accuracy_steps)
        result["models"][backbone] = entry
    for backbone, e in result["models"].items():
        if "accuracy" in e:
            a = e["accuracy"]
            print(f"\n{backbone}: {args.accuracy_steps} steps, L_KL first/last 20%: " + ", ".join(
                f"{n} {a[n]['first']:.3f} -> {a[n]['last']:.3f}" for n in a if n != "last_ratio")
                + f"; last ratio {a['last_ratio']:.3f}")
    if args.fit_epochs:
        fit = {p: accuracy_fit(cfg, p, args.fit_epochs, args.fit_persons)
               for p in ("fp32", "bf16")}
        result["teacher_fit"] = fit
        print(f"\nteacher stage ({cfg.teacher.model.backbone}, channels_last, kdray fit, "
              f"{args.fit_epochs} epochs)\n\n| precision | loss per epoch | img/s per epoch | "
              f"val AP |\n|---|---|---|---|")
        for p, r in fit.items():
            print(f"| {p} | {r['loss']} | {r['throughput']} | {r['val_AP']} |")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
