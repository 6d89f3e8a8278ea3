"""Ray Train overhead: the same TSD stage-1 step on the same resources, plain fit vs TorchTrainer.

Issue 9 (goal: Ray >= 0.97x the plain loop; Ray reports its Train within 2.5% of plain DDP).
Both sides run kdray's real code paths on the demo config: the plain loop is
``ray_train._fit_in_process`` (kdray.train.fit in this process, ``cpus`` torch threads), Ray is
``ray_train.fit_on_ray`` with ONE worker of ``cpus`` CPUs (the same threads, the same loader
workers), both without evaluation, both writing the per-epoch checkpoint. The teacher is an
untrained demo teacher (the step's cost does not depend on its weights).

Two numbers per side, from runs of 1 and ``--epochs`` epochs:
- in-loop images/s (fit's ``throughput`` of the epochs after the first): the step itself;
- wall seconds per extra epoch, ``(T(E) - T(1)) / (E - 1)``: the step plus everything done once
  per epoch (report barrier, checkpoint hand-over to Ray's storage). Ray's per-epoch fixed cost
  is its per-epoch wall time minus the plain loop's; its start-up cost is ``T(1)`` minus the
  plain ``T(1)``.

    python bench/train_overhead.py                    # 256 persons, 1 and 3 epochs, ~2-3 min
    python bench/train_overhead.py --persons 1024 --epochs 4 --repeats 2

Prints a Markdown table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdray.config import load_config, with_overrides
from kdray.orchestration import ray_train
from kdray.stages import build_stage
from kdray.train import save_checkpoint


def teacher_checkpoint(cfg, out: Path) -> str:
    """An untrained teacher in kdray's checkpoint format (what stage 1 loads)."""
    built = build_stage("teacher", cfg)
    path = out / "teacher" / "last.pt"
    save_checkpoint(path, {"model": built.task.checkpoint_state(), "meta": built.task.meta})
    return str(path)


def run(side: str, cfg, work: Path, inputs: dict, tag: str) -> tuple[float, list[float]]:
    """Wall seconds of one stage-1 run and fit's in-loop images/s per epoch."""
    stage_dir = work / f"{side}-{tag}"
    t0 = time.perf_counter()
    if side == "plain":
        res = ray_train._fit_in_process("student", cfg, stage_dir, inputs, None, evaluate=False)
    else:
        res = ray_train.fit_on_ray("student", cfg, stage_dir, inputs, f"overhead-{tag}",
                                   work / "ray_storage", None, evaluate=False)
    return time.perf_counter() - t0, [h["throughput"] for h in res.history]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--persons", type=int, default=256, help="training persons per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="the longer run (>= 2)")
    ap.add_argument("--cpus", type=int, default=2, help="torch threads = Ray worker CPUs")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = ap.parse_args(argv)

    cfg = with_overrides(load_config(args.config, args.overrides), {
        "data.max_train": args.persons, "ray.num_workers": 1,
        "ray.cpus_per_worker": float(args.cpus), "ray.max_failures": 0,
        "ray.use_gpu": "no"})
    torch.set_num_threads(args.cpus)
    work = Path(tempfile.mkdtemp(prefix="kdray-overhead-"))
    inputs = {"teacher": teacher_checkpoint(cfg, work)}
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=args.cpus)   # started once, outside the timings
    runs = {"plain": {1: [], args.epochs: []}, "ray": {1: [], args.epochs: []}}
    ips = {"plain": [], "ray": []}
    for rep in range(args.repeats):
        for epochs in (1, args.epochs):
            c = with_overrides(cfg, {"student.train.epochs": epochs})
            for side in ("plain", "ray"):   # alternate: load bursts hit both sides alike
                wall, thr = run(side, c, work, inputs, f"{epochs}e{rep}")
                runs[side][epochs].append(wall)
                ips[side] += thr[1:]
                print(f"[{side}] {epochs} epoch(s): {wall:.1f} s wall, in-loop img/s "
                      + ", ".join(f"{v:.1f}" for v in thr), flush=True)
    ray.shutdown()
    med = {s: {e: statistics.median(v) for e, v in r.items()} for s, r in runs.items()}
    per_epoch = {s: (med[s][args.epochs] - med[s][1]) / (args.epochs - 1) for s in med}
    loop = {s: statistics.median(v) for s, v in ips.items()}
    res = {"bench": "train_overhead", "config": args.config, "persons": args.persons,
           "cpus": args.cpus, "epochs": args.epochs, "repeats": args.repeats,
           "in_loop_img_per_s": loop, "in_loop_ratio": loop["ray"] / loop["plain"],
           "epoch_wall_s": per_epoch,
           "epoch_ratio": per_epoch["plain"] / per_epoch["ray"],
           "ray_fixed_cost_per_epoch_s": per_epoch["ray"] - per_epoch["plain"],
           "ray_startup_s": med["ray"][1] - med["plain"][1]}
    print(f"\nTSD stage-1 step ({cfg.student.model.backbone} <- {cfg.teacher.model.backbone}, "
          f"{cfg.data.input_size[0]}x{cfg.data.input_size[1]}), {args.persons} persons/epoch, "
          f"{args.cpus} CPUs: plain loop vs 1 Ray Train worker\n")
    print("| | plain fit | Ray TorchTrainer | Ray / plain |")
    print("|---|---|---|---|")
    print(f"| in-loop images/s | {loop['plain']:.1f} | {loop['ray']:.1f} | "
          f"{res['in_loop_ratio']:.3f} |")
    print(f"| wall s per epoch | {per_epoch['plain']:.2f} | {per_epoch['ray']:.2f} | "
          f"{res['epoch_ratio']:.3f} (throughput) |")
    print(f"| per-epoch fixed cost of Ray | | {res['ray_fixed_cost_per_epoch_s']:.2f} s | |")
    print(f"| start-up (1-epoch run) | {med['plain'][1]:.1f} s | {med['ray'][1]:.1f} s | "
          f"+{res['ray_startup_s']:.1f} s |")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
