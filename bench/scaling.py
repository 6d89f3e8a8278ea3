"""Data-parallel scaling on one machine: the TSD stage-1 step on 2 Ray Train workers x 1 CPU vs
1 worker x 2 CPUs, the same global batch (``train.batch_size``, split over the workers).

Issue 16. Both sides are ``ray_train.fit_on_ray`` on the demo config without evaluation, one
after the other in one run (load bursts of other jobs hit both alike only if you repeat:
``--repeats``). Reported:

- in-loop images/s over all ranks (fit's per-rank ``throughput`` x workers, epochs after the
  first) and the ratio 2x1 / 1x2: below 1 means DDP's gradient all-reduce and the smaller
  per-rank batches cost more than two single-threaded processes gain over one 2-thread one;
- the all-reduce of one step's gradients: a gloo ``all_reduce`` of a float32 tensor the size
  of the task's trainable parameters between the 2 workers, median over ``--iters`` calls
  (DDP overlaps its buckets with the backward pass, so the exposed cost per step is at most
  this).

    python bench/scaling.py                         # 1024 persons, 2 epochs per side
    python bench/scaling.py --persons 32 --epochs 2 --iters 1     # functional check only

Prints a Markdown table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import teacher_checkpoint  # noqa: E402

from kdray.config import load_config, with_overrides  # noqa: E402
from kdray.orchestration import ray_train  # noqa: E402
from kdray.stage_run import build_stage  # noqa: E402
from kdray.stages import TSD_STUDENT  # noqa: E402

SIDES = {"1x2": (1, 2.0), "2x1": (2, 1.0)}   # workers x CPUs each


def _allreduce_loop(config: dict) -> None:
    """On each worker: time ``iters`` all-reduces of one step's gradient volume."""
    import torch
    import torch.distributed as dist

    import ray.train
    torch.set_num_threads(1)
    flat = torch.randn(config["numel"])
    dist.all_reduce(flat)                          # warm-up: the first call sets up gloo
    times = []
    for _ in range(config["iters"]):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        times.append(time.perf_counter() - t0)
    if ray.train.get_context().get_world_rank() == 0:   # Ray Train V2 keeps metrics only
        Path(config["out"]).write_text(json.dumps(statistics.median(times)))  # with checkpoints


def allreduce_seconds(numel: int, iters: int, storage: Path) -> float:
    storage.mkdir(parents=True, exist_ok=True)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    out = storage / "allreduce.json"      # one machine: the workers share this folder
    trainer = TorchTrainer(_allreduce_loop, train_loop_config={"numel": numel, "iters": iters,
                                                               "out": str(out)},
                           scaling_config=ScalingConfig(num_workers=2,
                                                        resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="allreduce", storage_path=str(storage)))
    trainer.fit()
    return float(json.loads(out.read_text()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--persons", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2, help=">= 2: epoch 1 is warm-up")
    ap.add_argument("--iters", type=int, default=50, help="timed all-reduce calls")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = ap.parse_args(argv)
    os.environ.setdefault("KDRAY_PROGRESS", "0")
    base = load_config(args.config, args.overrides)
    cfg = with_overrides(base, {
        "data.max_train": args.persons, "student.train.epochs": args.epochs,
        "ray.max_failures": 0, "ray.use_gpu": "no",
        "data.root": str(Path(base.data.root).resolve())})
    work = Path(tempfile.mkdtemp(prefix="kdray-scaling-"))
    inputs = {"teacher": teacher_checkpoint(cfg, work)}
    numel = sum(p.numel() for p in build_stage(TSD_STUDENT, cfg, inputs).task
                .trainable_parameters())
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2)
    ips = {side: [] for side in SIDES}
    for rep in range(args.repeats):
        for side, (workers, cpus) in SIDES.items():
            c = with_overrides(cfg, {"ray.num_workers": workers, "ray.cpus_per_worker": cpus})
            hist = ray_train.fit_on_ray(TSD_STUDENT, c, work / f"{side}-{rep}", inputs,
                                        f"scaling-{side}-{rep}", work / "ray", None,
                                        evaluate=False).history
            ips[side] += [h["throughput"] * workers for h in hist[1:]]
            print(f"[{side}] in-loop img/s (all ranks) " + ", ".join(
                f"{h['throughput'] * workers:.1f}" for h in hist), flush=True)
    reduce_s = allreduce_seconds(numel, args.iters, work / "ray")
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    loop = {s: statistics.median(v) for s, v in ips.items()}
    batch = cfg.student.train.batch_size
    res = {"bench": "scaling", "config": args.config, "persons": args.persons,
           "global_batch": batch, "in_loop_img_per_s": loop,
           "ratio_2x1_over_1x2": loop["2x1"] / loop["1x2"],
           "grad_params": numel, "allreduce_s_per_step": reduce_s,
           "allreduce_share_of_2x1_step": reduce_s / (batch / loop["2x1"])}
    print(f"\nTSD stage-1 step ({cfg.student.model.backbone} <- {cfg.teacher.model.backbone}), "
          f"global batch {batch}, {args.persons} persons/epoch\n")
    print("| | 1 worker x 2 CPUs | 2 workers x 1 CPU | 2x1 / 1x2 |")
    print("|---|---|---|---|")
    print(f"| in-loop images/s | {loop['1x2']:.1f} | {loop['2x1']:.1f} | "
          f"{res['ratio_2x1_over_1x2']:.3f} |")
    print(f"| gradient all-reduce per step ({numel / 1e6:.2f} M fp32) | - | "
          f"{reduce_s * 1e3:.1f} ms ({res['allreduce_share_of_2x1_step']:.1%} of a step) | |")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
