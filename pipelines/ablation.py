"""One paper ablation table, top to bottom.

    python pipelines/ablation.py --table tsd-iv|cdkd-iii|cdkd-vi|cdkd-vii|cdkd-viii \
        [--config ...] [--seeds 3]

    rows (configs/ablations.yaml) -> how many stage runs the table takes (the stage cache
    shares stages between rows) -> the teacher, once -> rows x seeds as Tune trials, in
    parallel where resources allow -> Markdown table, Parquet file and bar chart with the
    paper's number beside the measured mean +- std, its 95% CI, the paired difference from
    the table's baseline row (CI, p, resolved or not) and each row's MLflow runs

Every row is the same code with a different config; on real data with the paper configs the
same command is the real reproduction. Ends with one JSON line (and summary.json).
"""
from __future__ import annotations

import json
import shutil
import sys

from kdray.orchestration.args import help_first

TABLES = ("tsd-iv", "cdkd-iii", "cdkd-vi", "cdkd-vii", "cdkd-viii")


def _options(p) -> None:
    p.add_argument("--table", required=True, choices=TABLES,
                   help="the paper table to run, rows from configs/ablations.yaml")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds per row; the statistics need >= 2 (default: %(default)s)")


if __name__ == "__main__":   # --help answers before torch, Ray and MLflow load
    help_first("ablation", __doc__, _options)

import pandas as pd

from kdray.orchestration.ablation import (bar_chart, finished_trials, load_table, markdown, plan,
                                          run_table, summarise)
from kdray.orchestration.pipeline import Pipeline, log, parse_args, primary_metric, stage_key
from kdray.stages import TEACHER


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args("ablation", argv, __doc__, _options)
    table = {**load_table(args.table), "name": args.table}
    with Pipeline(f"ablation-{args.table}", cfg, args) as p:
        teacher_key = stage_key(TEACHER, p.cfg, {})
        counts = plan(table, p.cfg, args.seeds, teacher_key)
        log(f"{args.table}: {len(table['rows'])} rows x {args.seeds} seeds = "
            f"{counts['trials']} trials -> {counts['stage_runs']} stage runs with the stage "
            f"cache ({counts['stage_runs_uncached']} without it)")
        teacher = p.teacher(args.teacher)                          # trained once, or given
        shutil.rmtree(p.out / "tune", ignore_errors=True)          # a fresh grid each time
        results = run_table(p, table, args.seeds, teacher)

        metric = primary_metric(p.cfg)
        records = summarise(table, finished_trials(results), metric)
        (p.out / "table.md").write_text(f"# {args.table} ({metric} on {p.cfg.data.dataset}, "
                                        f"{args.seeds} seeds)\n\n" + markdown(table, records,
                                                                               metric))
        pd.DataFrame(records).to_parquet(p.out / "table.parquet", index=False)
        measured = f"{p.cfg.data.dataset} val {metric.removeprefix('val_')}"
        bar_chart(table, records, measured, p.out / "table.png")
        p.tracker.log_artifacts([p.out / n for n in ("table.md", "table.parquet", "table.png")])
        print((p.out / "table.md").read_text(), file=sys.stderr)

        stages: dict = {}   # (stage, key) -> reused by every trial that used it
        for r in results:
            for s, k, reused in json.loads(r.metrics["stages"]) if r.error is None else ():
                stages[(s, k)] = stages.get((s, k), True) and reused
        trained = sum(not reused for reused in stages.values()) + (not teacher.reused)
        metrics = {"rows": float(len(records)), "trials": float(counts["trials"]),
                   "trials_failed": float(sum(r.error is not None for r in results)),
                   "stage_runs_planned": float(counts["stage_runs"]),
                   "stage_runs_uncached": float(counts["stage_runs_uncached"]),
                   "stage_runs_trained": float(trained),
                   **{f"{metric}_{r['row']}": r["mean"] for r in records}}
        return p.finish(metrics, {n: str(p.out / f"table.{n}") for n in ("md", "parquet", "png")}
                        | {"mlflow_run_ids": {r["row"]: r["mlflow_run_ids"] for r in records}})


if __name__ == "__main__":
    from kdray.errors import run_main  # a user's mistake: one line on stderr, exit code 2
    sys.exit(run_main(main, sys.argv[1:], "pipelines/ablation.py"))
