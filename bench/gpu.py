"""GPU rows of issue 9: SimCC HRNet-W32 256x192 training and the TSD stage-1 step with an
HRNet-W48 teacher, fp32 vs bf16 autocast: images/s, peak memory and model FLOPs utilisation.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one forward (batch 1, scaled
by the batch): a training step counts 3x the trained network's forward (forward + backward
~ 2x forward), plus 1x the frozen teacher's forward in the TSD step. MFU = achieved FLOP/s
over the GPU's dense bf16 peak (``--peak-tflops``; default from the device name: H100/H200
SXM 989, H100 PCIe 756, A100 312) -- for fp32 too, so the two rows compare on one scale.
Both precisions use channels_last; ``--compile`` adds torch.compile rows. Steps use random
inputs (throughput does not depend on the data); fp32 and bf16 cells alternate ``--repeats``
times and each is the median, so the ratio is measured in one run.

    python bench/gpu.py                           # needs CUDA; ~2-4 min on an H100
    python bench/gpu.py --batch 64 --compile --repeats 3

Without CUDA it prints what it would measure and exits 0. Prints a Markdown table, then one
JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from kdray.codecs.simcc import SimCCCodec
from kdray.config import ModelConfig, TSDStage1Config
from kdray.data.keypoints import COCO
from kdray.losses import tsd
from kdray.nn.pose_model import build_pose_model
from kdray.tasks import SimCCTask, TSDStage1Task

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L4": 121.0, "A10": 125.0}
SIZE, K = (256, 192), 2.0


def forward_flops(model, size) -> float:
    """FLOPs of one forward at batch 1 (flop_counter counts a multiply-add as 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(1, 3, *size, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return float(fc.get_total_flops())


def make_task(kind: str, device):
    codec = SimCCCodec(SIZE, K, 6.0)
    flip = COCO.flip_index()
    student = build_pose_model(ModelConfig(backbone="hrnet_w32"), codec, flip)
    if kind == "simcc":
        task, teacher = SimCCTask(student), None
    else:
        teacher = build_pose_model(ModelConfig(backbone="hrnet_w48"), codec, flip)
        edges = torch.tensor(COCO.skeleton, dtype=torch.long)
        task = TSDStage1Task(student, teacher, TSDStage1Config(), edges,
                             tsd.edge_weights(COCO.skeleton, "uniform", None))
    task = task.to(device).to(memory_format=torch.channels_last)
    flops = 3 * forward_flops(student, SIZE) + (forward_flops(teacher, SIZE) if teacher else 0)
    return task, flops


def batch_on(device, batch: int) -> dict:
    wx, hy = int(SIZE[1] * K), int(SIZE[0] * K)
    return {"image": torch.randint(0, 255, (batch, 3, *SIZE), dtype=torch.uint8, device=device),
            "target_x": torch.softmax(torch.randn(batch, 17, wx, device=device), -1),
            "target_y": torch.softmax(torch.randn(batch, 17, hy, device=device), -1),
            "target_weight": torch.ones(batch, 17, device=device)}


def measure(task, batch: dict, bf16: bool, steps: int, warmup: int) -> tuple[float, float]:
    """(images/s, peak GiB) of ``steps`` timed training steps."""
    from kdray.train import Progress
    opt = torch.optim.Adam([p for p in task.trainable_parameters() if p.requires_grad], 1e-4)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else \
        contextlib.nullcontext
    prog = Progress(1, 10, 0.0)

    def step():
        with ctx():
            loss = task(batch, prog)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return len(batch["image"]) * steps / dt, torch.cuda.max_memory_allocated() / 2**30


def peak_tflops(name: str, given: float) -> float:
    if given:
        return given
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return v
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16)")


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py needs CUDA (no GPU here). It would measure: SimCC HRNet-W32 256x192 "
              "training and the TSD stage-1 step (HRNet-W48 teacher), fp32 vs bf16 autocast: "
              "images/s, peak memory, MFU. Run on a GPU machine: python bench/gpu.py")
        return None
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name, args.peak_tflops)
    rows = []
    for kind in ("simcc", "tsd_stage1"):
        task, flops = make_task(kind, dev)
        if args.compile:
            from kdray.train import compile_pose_models
            compile_pose_models(task)
        batch = batch_on(dev, args.batch)
        cells: dict[str, list] = {"fp32": [], "bf16": []}
        for _ in range(args.repeats):
            for prec in cells:
                cells[prec].append(measure(task, batch, prec == "bf16", args.steps, args.warmup))
        for prec, v in cells.items():
            ips = statistics.median(x[0] for x in v)
            rows.append({"step": kind, "precision": prec, "img_per_s": ips,
                         "peak_gib": max(x[1] for x in v), "gflop_per_img": flops / 1e9,
                         "mfu": ips * flops / (peak * 1e12)})
        rows[-1]["bf16_over_fp32"] = rows[-1]["img_per_s"] / rows[-2]["img_per_s"]
        del task
        torch.cuda.empty_cache()
    print(f"\n{name}, batch {args.batch}, 256x192, channels_last"
          f"{', compiled' if args.compile else ''}, MFU vs {peak:.0f} TFLOPS dense bf16\n")
    print("| step | precision | img/s | bf16 / fp32 | peak GiB | GFLOP/img (3x fwd) | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['bf16_over_fp32']:.2f}x" if "bf16_over_fp32" in r else ""
        print(f"| {r['step']} | {r['precision']} | {r['img_per_s']:.0f} | {ratio} | "
              f"{r['peak_gib']:.1f} | {r['gflop_per_img']:.1f} | {100 * r['mfu']:.1f}% |")
    res = {"bench": "gpu", "device": name, "batch": args.batch, "compile": args.compile,
           "peak_tflops": peak, "rows": rows}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
