"""The two costs of issue 8, measured in one run (CPU; the smoke config unless --config):

1. a TSD stage-2 (GCN) trial on the cached frozen-network shards vs one that recomputes the
   frozen student and teacher itself (same seed, same epochs): fit seconds and their ratio,
   plus the one-off cost of building the shards;
2. the orchestration overhead of a 4-trial sweep (pipelines/sweep.py on search_spaces/cdkd.yaml):
   the sweep's wall time over the sum of its trials' training times (each trial's build + fit).

    OMP_NUM_THREADS=1 .venv/bin/python bench/sweep_costs.py [--config configs/smoke.yaml]
        [--gcn-epochs 3] [--cdkd-epochs 3] [--out /tmp/kdray-bench-sweep]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def gcn_costs(config: str, out: Path, epochs: int, persons: int) -> dict:
    import torch

    from kdray.config import load_config
    from kdray.stage_run import build_frozen_cache, ensure_data, run_stage
    torch.set_num_threads(1)
    cfg = load_config(config, [f"data.root={out / 'data'}", "ray.num_workers=0",
                               f"tsd.stage2.train.epochs={epochs}", "tsd.stage2.mode=teacher",
                               f"tsd.stage2.train.eval_every={epochs}",   # val once, at the end
                               f"data.synth.train={persons}"])
    ensure_data(cfg)
    teacher = run_stage("teacher", cfg, out / "teacher").checkpoint
    student = run_stage("student", cfg, out / "student", {"teacher": str(teacher)}).checkpoint
    inputs = {"teacher": str(teacher), "student": str(student)}
    t0 = time.perf_counter()
    direct = run_stage("gcn", cfg, out / "gcn_direct", inputs)
    t_direct = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = build_frozen_cache(cfg, inputs, out / "frozen")
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = run_stage("gcn", cfg, out / "gcn_cached", inputs, frozen=cache)
    t_cached = time.perf_counter() - t0
    return {"gcn_trial_recompute_s": round(t_direct, 2), "gcn_trial_cached_s": round(t_cached, 2),
            "gcn_cached_speedup": round(t_direct / t_cached, 2),
            # the training epochs alone (no stage build, no evaluation)
            "gcn_train_epochs_speedup": round(_epoch_s(direct) / _epoch_s(cached), 2),
            "frozen_cache_build_s": round(t_build, 2),
            "gcn_loss_recompute": direct.metrics["loss"], "gcn_loss_cached": cached.metrics["loss"],
            "persons": cfg.data.synth.train, "epochs": epochs}


def _epoch_s(result) -> float:
    return sum(h["epoch_seconds"] for h in result.history)


def sweep_costs(config: str, out: Path, epochs: int) -> dict:
    import importlib.util
    spec = importlib.util.spec_from_file_location("sweep", REPO / "pipelines" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    summary = sweep.main([str(REPO / "search_spaces" / "cdkd.yaml"), "--config", config,
                          "--storage", str(out), "--num-samples", "4",
                          f"data.root={out / 'data'}", f"cdkd.student.train.epochs={epochs}"])
    m = summary["metrics"]
    return {"sweep_wall_s": m["sweep_seconds"], "sum_trial_train_s": m["trial_train_seconds"],
            "sweep_overhead_ratio": m["overhead_ratio"], "trials": m["trials"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "smoke.yaml"))
    p.add_argument("--gcn-epochs", type=int, default=3)
    p.add_argument("--gcn-persons", type=int, default=600, help="SynthPose training persons")
    p.add_argument("--cdkd-epochs", type=int, default=3)
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--out", default="/tmp/kdray-bench-sweep")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    result = {"config": args.config,
              **gcn_costs(args.config, out / "gcn", args.gcn_epochs, args.gcn_persons)}
    if not args.skip_sweep:
        result.update(sweep_costs(args.config, out / "sweep", args.cdkd_epochs))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
