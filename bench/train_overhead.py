"""Ray Train overhead: the same TSD stage-1 step on the same resources, plain fit vs TorchTrainer.

Issue 9 (goal: Ray >= 0.97x the plain loop; Ray reports its Train within 2.5% of plain DDP).
Both sides run kdray's real code paths on the demo config: the plain loop is
``ray_train._fit_in_process`` (kdray.train.fit in this process, ``cpus`` torch threads), Ray is
``ray_train.fit_on_ray`` with ONE worker of ``cpus`` CPUs (the same threads, the same loader
workers), both without evaluation, both writing the per-epoch checkpoint. The teacher is an
untrained demo teacher (the step's cost does not depend on its weights).

Per side, from runs of ``--epochs`` and of 1 epoch:
- in-loop images/s (fit's ``throughput`` of the epochs after the first): the step itself;
- time outside the loop, ``O(E) = wall - sum of fit's epoch_seconds``; the fixed cost per epoch
  is ``(O(E) - O(1)) / (E - 1)`` (report barrier, checkpoint hand-over to Ray's storage) and the
  rest of ``O(1)`` is start-up (worker group, dataset, models). Subtracting the in-loop time
  keeps load bursts of other jobs during the steps out of these two numbers.
- a demo epoch (``data.synth.train`` persons) at those rates: plain / Ray time = the ratio the
  goal (>= 0.97) is about.

Ray starts as kdray starts its local Ray (ray_train.LEAN_LOCAL_RAY, no dashboard) and its
Train controller polls every 0.5 s (ray_train.CONTROLLER_POLL); ``--ray-defaults`` starts it
with Ray's defaults instead (dashboard, daemons, 2-s poll).

    python bench/train_overhead.py                    # 1024 persons, 1 and 3 epochs, ~2 min
    python bench/train_overhead.py --persons 1536 --repeats 3     # ~5 min, epochs of ~6 s

Keep epochs longer than ~3 s: ``ray.train.report`` waits for Ray's controller to collect the
previous report, which it polls every 2 s by default (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``; kdray
sets 0.5 s), so very short epochs show a per-epoch cost that a real epoch never pays (measured
with the 2-s poll: report of a 12 MB checkpoint after >= 3 s of work 0.01-0.02 s; back-to-back
reports 2.0 s each).

Prints a Markdown table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdray.config import load_config, with_overrides
from kdray.orchestration import ray_train
from kdray.stage_run import build_stage
from kdray.stages import TSD_STUDENT
from kdray.train import save_checkpoint


def teacher_checkpoint(cfg, out: Path) -> str:
    """An untrained teacher in kdray's checkpoint format (what stage 1 loads)."""
    built = build_stage("teacher", cfg)
    path = out / "teacher" / "last.pt"
    save_checkpoint(path, {"model": built.task.checkpoint_state(), "meta": built.task.meta})
    return str(path)


def run(side: str, cfg, work: Path, inputs: dict, tag: str) -> tuple[float, list[dict]]:
    """Wall seconds of one stage-1 run and fit's per-epoch history (throughput, epoch_seconds)."""
    stage_dir = work / f"{side}-{tag}"
    t0 = time.perf_counter()
    if side == "plain":
        res = ray_train._fit_in_process(TSD_STUDENT, cfg, stage_dir, inputs, None, evaluate=False)
    else:
        res = ray_train.fit_on_ray(TSD_STUDENT, cfg, stage_dir, inputs, f"overhead-{tag}",
                                   work / "ray_storage", None, evaluate=False)
    return time.perf_counter() - t0, res.history


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--persons", type=int, default=1024, help="training persons per epoch "
                    "(keep epochs >= 3 s: see above)")
    ap.add_argument("--epochs", type=int, default=3, help="the longer run (>= 2)")
    ap.add_argument("--cpus", type=int, default=2, help="torch threads = Ray worker CPUs")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--ray-defaults", action="store_true",
                    help="start Ray with its defaults (dashboard, metrics, idle workers) "
                         "instead of the lean local Ray that kdray starts")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = ap.parse_args(argv)
    os.environ.setdefault("KDRAY_PROGRESS", "0")   # no progress bars in the bench output

    base = load_config(args.config, args.overrides)
    cfg = with_overrides(base, {
        "data.max_train": args.persons, "ray.num_workers": 1,
        "ray.cpus_per_worker": float(args.cpus), "ray.max_failures": 0,
        "ray.use_gpu": "no",
        "data.root": str(Path(base.data.root).resolve())})  # a Ray worker's cwd differs
    torch.set_num_threads(args.cpus)
    work = Path(tempfile.mkdtemp(prefix="kdray-overhead-"))
    inputs = {"teacher": teacher_checkpoint(cfg, work)}
    import ray
    if not ray.is_initialized():   # started once, outside the timings
        # Ray's defaults: also its 2-s controller poll (fit_on_ray's 0.5 s yields to a setting)
        lean = ({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"} if args.ray_defaults
                else ray_train.LEAN_LOCAL_RAY)
        os.environ.update(lean)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=args.ray_defaults)
    outside = {"plain": {1: [], args.epochs: []}, "ray": {1: [], args.epochs: []}}
    ips = {"plain": [], "ray": []}
    for rep in range(args.repeats):
        for epochs in (args.epochs, 1):
            c = with_overrides(cfg, {"student.train.epochs": epochs})
            for side in ("plain", "ray"):   # alternate: load bursts hit both sides alike
                wall, hist = run(side, c, work, inputs, f"{epochs}e{rep}")
                loop_s = sum(h["epoch_seconds"] for h in hist)
                outside[side][epochs].append(wall - loop_s)   # everything but the steps
                if epochs > 1:
                    ips[side] += [h["throughput"] for h in hist[1:]]   # epoch 1: warm-up
                print(f"[{side}] {epochs} epoch(s): {wall:.1f} s wall, {loop_s:.1f} s in the "
                      f"loop, in-loop img/s " + ", ".join(f"{h['throughput']:.1f}" for h in hist),
                      flush=True)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    med = {s: {e: statistics.median(v) for e, v in r.items()} for s, r in outside.items()}
    # signed: a negative value means below the noise of the start-up time
    fixed = {s: (med[s][args.epochs] - med[s][1]) / (args.epochs - 1) for s in med}
    loop = {s: statistics.median(v) for s, v in ips.items()}
    n_demo = base.data.max_train or base.data.synth.train
    epoch_s = {s: n_demo / loop[s] + max(0.0, fixed[s]) for s in loop}
    res = {"bench": "train_overhead", "config": args.config, "persons": args.persons,
           "cpus": args.cpus, "epochs": args.epochs, "repeats": args.repeats,
           "in_loop_img_per_s": loop, "in_loop_ratio": loop["ray"] / loop["plain"],
           "fixed_cost_per_epoch_s": fixed,
           "ray_fixed_cost_per_epoch_s": fixed["ray"] - fixed["plain"],
           "startup_s": {s: med[s][1] - fixed[s] for s in med},
           "demo_epoch_persons": n_demo, "demo_epoch_s": epoch_s,
           "demo_epoch_ratio": epoch_s["plain"] / epoch_s["ray"]}
    print(f"\nTSD stage-1 step ({cfg.student.model.backbone} <- {cfg.teacher.model.backbone}, "
          f"{cfg.data.input_size[0]}x{cfg.data.input_size[1]}), {args.persons} persons/epoch, "
          f"{args.cpus} CPUs: plain loop vs 1 Ray Train worker\n")
    print("| | plain fit | Ray TorchTrainer | Ray / plain |")
    print("|---|---|---|---|")
    print(f"| in-loop images/s (epochs 2..{args.epochs}) | {loop['plain']:.1f} | "
          f"{loop['ray']:.1f} | {res['in_loop_ratio']:.3f} |")
    print(f"| fixed cost per epoch, s (outside the loop) | {fixed['plain']:.2f} | "
          f"{fixed['ray']:.2f} | {res['ray_fixed_cost_per_epoch_s']:+.2f} s |")
    print(f"| start-up per run, s | {res['startup_s']['plain']:.1f} | "
          f"{res['startup_s']['ray']:.1f} | |")
    print(f"| demo epoch ({n_demo} persons), s | {epoch_s['plain']:.1f} | {epoch_s['ray']:.1f} "
          f"| {res['demo_epoch_ratio']:.3f} (throughput) |")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
