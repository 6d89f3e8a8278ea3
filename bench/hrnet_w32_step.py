"""Timing of SimCC training steps on CPU (forward + L_KL + backward + Adam step).

Default: one step of the paper-size model, SimCC HRNet-W32 at 256x192, batch 2:

    .venv/bin/python bench/hrnet_w32_step.py

``--sweep`` measures training images/s of the demo-size candidates instead (batch 32, a few
seconds each), fp32 versus bf16 autocast + channels_last:

    .venv/bin/python bench/hrnet_w32_step.py --sweep --threads 2

Inputs and targets are random (throughput does not depend on the data). Numbers on a machine
shared with other jobs are noisy: rerun and compare within one run.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from kdray.codecs.simcc import SimCCCodec
from kdray.config import ModelConfig
from kdray.eval.complexity import complexity
from kdray.losses.simcc import simcc_kl_loss
from kdray.data.keypoints import spec_for_count
from kdray.nn.pose_model import build_pose_model

SWEEP_BACKBONES = ("hrnet_w18_small", "hrnet_w18_small_v2", "mobilenetv3_small_100", "resnet18")
SWEEP_SIZES = ((96, 64), (128, 96))


def make_step(backbone: str, size: tuple[int, int], batch: int, bf16: bool, channels_last: bool,
              k: float = 2.0, joints: int = 17):
    """A closure running one training step; returns (step, model)."""
    torch.manual_seed(0)
    model = build_pose_model(ModelConfig(backbone=backbone), SimCCCodec(size, k),
                             spec_for_count(joints).flip_index()).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    h, w = size
    images = torch.randn(batch, 3, h, w).contiguous(memory_format=fmt)
    tx = torch.softmax(torch.randn(batch, joints, model.bins[0]), -1)
    ty = torch.softmax(torch.randn(batch, joints, model.bins[1]), -1)
    weight = torch.ones(batch, joints)

    def step() -> float:
        ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
        with ctx:
            out = model(images)
        loss = simcc_kl_loss(out["logits_x"], out["logits_y"], tx, ty, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step, model


def images_per_second(step, batch: int, seconds: float, warmup_s: float = 2.0) -> float:
    """Median images/s over timed steps (robust to other jobs' bursts on a shared machine).

    Warm-up runs for at least 3 steps and ``warmup_s`` seconds: the first bf16 steps in a process
    are several times slower while oneDNN builds its kernels for every new shape.
    """
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < warmup_s:
        step()
        n += 1
    times, t0 = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def single_step(args) -> None:
    size = tuple(args.size)
    step, model = make_step(args.backbone, size, args.batch, args.bf16, args.channels_last)
    c = complexity(model, size)
    print(f"SimCC {args.backbone} {size[0]}x{size[1]}: {c['params_m']:.2f}M params, "
          f"{c['gmacs']:.2f} GMACs ({c['gflops']:.2f} GFLOPs) per image")
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        print(f"step {i}: forward+backward+Adam, batch {args.batch}, {dt:.2f} s "
              f"({args.batch / dt:.1f} img/s), loss {loss:.3f}")


def sweep(args) -> None:
    """fp32 vs bf16 + channels_last, measured alternately ``--repeats`` times, best kept."""
    print(f"training img/s, batch {args.batch}, {torch.get_num_threads()} threads, best of "
          f"{args.repeats} x ~{args.seconds:.0f} s per cell")
    print("| backbone | input HxW | fp32 | bf16 + channels_last | speed-up |")
    print("|---|---|---|---|---|")
    for backbone in SWEEP_BACKBONES:
        for size in SWEEP_SIZES:
            steps = [make_step(backbone, size, args.batch, bf, bf)[0] for bf in (False, True)]
            r = [0.0, 0.0]
            for _ in range(args.repeats):
                for i, step in enumerate(steps):
                    r[i] = max(r[i], images_per_second(step, args.batch, args.seconds))
            print(f"| {backbone} | {size[0]}x{size[1]} | {r[0]:.0f} | {r[1]:.0f} | "
                  f"{r[1] / r[0]:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="hrnet_w32")
    ap.add_argument("--size", type=int, nargs=2, default=(256, 192), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=None, help="2 for one step, 32 for --sweep")
    ap.add_argument("--steps", type=int, default=2, help="steps to time (the first is warm-up)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = default")
    ap.add_argument("--sweep", action="store_true", help="demo-size img/s table")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per sweep cell")
    ap.add_argument("--repeats", type=int, default=2, help="sweep: measurements per cell")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch is None:
        args.batch = 32 if args.sweep else 2
    (sweep if args.sweep else single_step)(args)


if __name__ == "__main__":
    main()
