"""A hyperparameter sweep over one stage, top to bottom.

    python pipelines/sweep.py search_spaces/tsd_stage1.yaml [--config ...] [--num-samples N]
    python pipelines/sweep.py search_spaces/cdkd.yaml --config configs/smoke.yaml --resume

    validate the search space -> the stages it builds on, once (stage cache): the teacher, for
    stage 2 also the stage-1 student and the frozen networks' outputs (Parquet shards)
    -> Ray Tune: Optuna TPE (define-by-run) + ASHA, one MLflow child run per trial
    -> best config as YAML, its model registered as `candidate`

Interrupted (killed, machine lost)? The same command with --resume continues: finished trials
are kept, unfinished ones resume from their last checkpoint. Ends with one JSON line.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from kdray.orchestration.args import help_first


def _options(p) -> None:
    p.add_argument("space", help="search space file (search_spaces/*.yaml)")
    p.add_argument("--num-samples", type=int, default=8,
                   help="number of trials (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep in --out instead of starting over")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler seed (default: %(default)s)")


if __name__ == "__main__":   # --help answers before torch, Ray and MLflow load
    help_first("sweep", __doc__, _options)

from kdray.config import dump_yaml, with_overrides
from kdray.orchestration.pipeline import Pipeline, parse_args, primary_metric
from kdray.orchestration.search_space import load_space, metric_mode
from kdray.stages import TEACHER, TSD_REFINED, TSD_STUDENT
from kdray.orchestration.tune import close_trial_runs, frozen_outputs, sweep, uses_frozen_cache


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args("sweep", argv, __doc__, _options)
    space = load_space(args.space, cfg)                # fails here, naming file and key
    metric = space.metric or primary_metric(cfg)
    p = Pipeline("sweep", cfg, args)
    state = p.out / "sweep.json"                       # the parent run to continue on --resume
    previous = json.loads(state.read_text()) if args.resume and state.exists() else {}
    with p.resume(previous.get("mlflow_run_id", "")):
        if not previous:                               # a new sweep replaces an old one here
            for old in ("tune", "trials"):
                shutil.rmtree(p.out / old, ignore_errors=True)
        state.write_text(json.dumps({"mlflow_run_id": p.run_id, "space": space.file}))
        p.tracker.log_artifacts([Path(args.space)])

        inputs = {}                                    # upstream stages, trained once
        if space.stage is not TEACHER:
            inputs["teacher"] = p.teacher(args.teacher)
        if space.stage is TSD_REFINED:
            inputs["student"] = p.stage(TSD_STUDENT, label="stage1", teacher=inputs["teacher"])
        frozen = frozen_outputs(p, inputs) if uses_frozen_cache(space) else ""

        t0 = time.perf_counter()
        results = sweep(space, p.cfg, out=p.out, inputs={k: r.checkpoint for k, r in
                                                         inputs.items()},
                        frozen=str(frozen), tracker=p.tracker, metric=metric,
                        num_samples=args.num_samples, resume=bool(previous), seed=args.seed)
        wall = time.perf_counter() - t0

        trials = close_trial_runs(p, results)
        table = p.out / "trials.csv"
        results.get_dataframe().to_csv(table, index=False)
        best = results.get_best_result(metric, metric_mode(metric))
        best_id = best.metrics["trial_id"]
        best_cfg = with_overrides(p.cfg, space.overrides(best.config, p.cfg), "<best trial>")
        dump_yaml(best_cfg, p.out / "best_config.yaml")
        p.tracker.log_artifacts([table, p.out / "best_config.yaml"])
        # The best trial's model, registered under the stage's name as a candidate only.
        best_run = p.adopt(space.stage, best_cfg, trials[best_id]["dir"],
                           trials[best_id]["run_id"], best.metrics, **inputs)
        model = p.register(best_run, metric, promote=False,
                           description=f"best trial of the sweep {p.out}")

        train = sum(t["train_seconds"] for t in trials.values())
        metrics = {f"best_{metric}": best.metrics[metric], "trials": float(len(trials)),
                   "trials_finished": float(sum(t["finished"] for t in trials.values())),
                   "trials_stopped": float(sum(t["stopped"] for t in trials.values())),
                   "sweep_seconds": round(wall, 1), "trial_train_seconds": round(train, 1),
                   "overhead_ratio": round(wall / max(train, 1e-9), 3)}
        return p.finish(metrics, {"best_config": str(p.out / "best_config.yaml"),
                                  "best_trial": best_id, "trials_csv": str(table),
                                  "tune_dir": str(p.out / "tune" / "sweep"),
                                  "frozen_cache": str(frozen),
                                  "candidate": model["uri"] if model else "",
                                  "trial_attempts": {k: t["attempts"]
                                                     for k, t in trials.items()}})


if __name__ == "__main__":
    from kdray.errors import run_main  # a user's mistake: one line on stderr, exit code 2
    sys.exit(run_main(main, sys.argv[1:], "pipelines/sweep.py"))
