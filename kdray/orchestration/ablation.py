"""The papers' ablation tables as Ray Tune grids: rows (configs/ablations.yaml) x seeds.

Each (row, seed) is one Tune trial that runs the row's stages (its ``stages`` in
configs/ablations.yaml: TSD stage 1, then stage 2 unless the row lists only stage 1; the CDKD
student) through the same cached stages as
pipelines/two_stage.py and pipelines/cdkd.py. Rows that share a stage share its cache entry:
Table IV's s4 and s6 train one stage-1 student, baseline, s1 and s5 one undistilled student; a
stage wanted by two trials at once is trained by the first and reused by the second (a file
lock per stage key). The teacher is trained (or found) once on the driver before the grid.
The seed of seed k adds k to the student, stage-2 and CDKD training seeds (the teacher is shared).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import yaml

from kdray.console import log
from kdray.progress import clock
from kdray.config import (ConfigError, ExperimentConfig, from_dict, get_dotted, to_dict,
                          with_overrides)
from kdray.eval import stats
from kdray.orchestration import ray_train
from kdray.orchestration.pipeline import Pipeline, StageResult, primary_metric, stage_key
from kdray.orchestration.tracking import numeric
from kdray.stages import STAGES, Stage

TABLES_FILE = Path(__file__).resolve().parents[2] / "configs" / "ablations.yaml"
# What a table's seed k moves (+k): every trained stage's seed but the teacher's (shared).
SEED_FIELDS = ("student.train.seed", "tsd.stage2.train.seed", "cdkd.student.train.seed")


def load_table(name: str, path: str | Path = TABLES_FILE) -> dict:
    tables = yaml.safe_load(Path(path).read_text())
    if name not in tables:
        raise KeyError(f"{path}: no table {name!r} (known: {', '.join(tables)})")
    table = tables[name]
    if table.get("baseline", next(iter(table["rows"]))) not in table["rows"]:
        raise ConfigError(f"{path}: {name}.baseline: {table['baseline']!r} is not a row "
                          f"(rows: {', '.join(table['rows'])})")
    return table


def row_config(cfg: ExperimentConfig, table: dict, row: str, seed: int) -> ExperimentConfig:
    """The row's overrides, then the seed offset on every trained stage but the teacher."""
    cfg = with_overrides(cfg, table["rows"][row]["set"], source=f"ablations.yaml: {row}")
    return with_overrides(cfg, {k: get_dotted(cfg, k) + seed for k in SEED_FIELDS})


def row_kinds(table: dict, row: str) -> list[Stage]:
    """The stage kinds a row trains after the teacher: the row's ``stages``, else the table's."""
    names = table["rows"][row].get("stages", table["stages"])
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ConfigError(f"ablations.yaml: {row}: stages: unknown {unknown}; known: "
                          f"{', '.join(STAGES)}")
    return [STAGES[n] for n in names]


def row_stages(kinds: list[Stage], cfg: ExperimentConfig,
               teacher_key: str) -> list[tuple[str, str]]:
    """The (stage, key) pairs a row runs after the teacher: what the stage cache dedupes.
    Each stage's ``student`` input is the stage before it."""
    keys, out = {"teacher": teacher_key}, []
    for stage in kinds:
        key = stage_key(stage, cfg, {n: keys[n] for n in stage.inputs(cfg)})
        out.append((stage.name, key))
        keys["student"] = key
    return out


def plan(table: dict, cfg: ExperimentConfig, seeds: int, teacher_key: str) -> dict:
    """How many stage runs the table takes with the stage cache, and without it."""
    per_trial = [row_stages(row_kinds(table, r), row_config(cfg, table, r, s), teacher_key)
                 for r in table["rows"] for s in range(seeds)]
    unique = {st for stages in per_trial for st in stages}
    return {"trials": len(per_trial), "stage_runs": len(unique) + 1,       # + the teacher
            "stage_runs_uncached": sum(len(s) + 1 for s in per_trial)}


# ----------------------------------------------------------------------------- the trial

def run_row(config: dict, ctx: dict) -> None:
    """Tune trainable: one row with one seed, through the shared stage cache."""
    import torch
    from ray import tune

    table, row, seed = ctx["table"], config["row"], int(config["seed"])
    cfg = row_config(from_dict(ctx["cfg"], "<ablation>"), table, row, seed)
    if cfg.ray.num_workers <= 1:                       # one worker: fit in this trial actor
        cfg = with_overrides(cfg, {"ray.num_workers": 0})
    torch.set_num_threads(max(1, int(ctx["cpus_per_trial"])))
    results = {"teacher": StageResult(**ctx["teacher"])}
    # The row's run is a child of the table's; the row's stage runs are children of it.
    with ctx["tracker"].run(f"{row}/seed{seed}", tags={"kdray.row": row, "kdray.seed": str(seed),
                                                       "kdray.table": table["name"]},
                            params=table["rows"][row]["set"]) as run:
        p = Pipeline(f"{table['name']}-{row}", cfg, argparse.Namespace(**ctx["paths"]),
                     tracker=run)
        for stage in row_kinds(table, row):   # each stage's student is the one before it
            final = results["student"] = p.stage(
                stage, **{n: results[n] for n in stage.inputs(cfg)})
        metrics = numeric(final.metrics)
        run.log_metrics(metrics)
    stages = [[r.stage, r.key, r.reused] for r in p.results.values()]
    tune.report({**{k: v for k, v in metrics.items() if k.startswith("val_")},
                 "mlflow_run_id": run.run_id, "stages": json.dumps(stages)})


# ----------------------------------------------------------------------------- the grid

def run_table(p: Pipeline, table: dict, seeds: int, teacher: StageResult):
    """All rows x seeds as one Tune grid; the ResultGrid."""
    import ray
    from ray import tune

    from kdray.console import verbose
    from kdray.orchestration.tune import fit_quietly, max_concurrent, trial_resources
    ray_train.ensure_ray()
    resources, cpus, gpus = trial_resources(p.cfg, ray_train._use_gpu(p.cfg))
    ctx = {"table": table, "cfg": to_dict(p.cfg), "teacher": dataclasses.asdict(teacher),
           "tracker": p.tracker, "cpus_per_trial": cpus,
           "paths": {"storage": str(p.storage), "out": str(p.out), "cache": str(p.cache)}}
    trainable = tune.with_resources(tune.with_parameters(run_row, ctx=ctx), resources)
    progress = TrialProgress(table["name"], primary_metric(p.cfg), len(table["rows"]) * seeds)
    tuner = tune.Tuner(
        trainable,
        param_space={"row": tune.grid_search(list(table["rows"])),
                     "seed": tune.grid_search(list(range(seeds)))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent(ray.cluster_resources(), cpus, gpus),
            reuse_actors=True),
        run_config=tune.RunConfig(name=f"ablation-{table['name']}",
                                  storage_path=str(p.out / "tune"),
                                  verbose=1 if verbose() else 0,   # Tune's tables: --verbose
                                  callbacks=[progress]))
    return fit_quietly(tuner)


def _callback_base():
    from ray.tune import Callback
    return Callback


class TrialProgress(_callback_base()):
    """One console line per finished trial: its row, seed and metric, how many are done and
    the time left at the rate trials have finished so far (reused stages make it rough)."""

    def __init__(self, name: str, metric: str, total: int):
        self.name, self.metric, self.total = name, metric, total
        self.t0 = time.monotonic()
        self.done = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        m = (trial.last_result or {}).get(self.metric)
        value = f"{m:.2f}" if isinstance(m, (int, float)) else "-"
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        log(f"{self.name}: trial {self.done}/{self.total} done, row {trial.config['row']} "
            f"seed {trial.config['seed']}: {self.metric.removeprefix('val_')} {value} "
            f"({clock(elapsed)} elapsed, ~{clock(eta)} left)")


def finished_trials(results) -> list[tuple[str, int, dict]]:
    """(row, seed, metrics) of each trial of a Tune ResultGrid that finished without error."""
    return [(r.config["row"], int(r.config["seed"]), r.metrics) for r in results
            if r.error is None]


def summarise(table: dict, trials: list[tuple[str, int, dict]], metric: str) -> list[dict]:
    """One record per row: the paper's numbers beside the measured mean +- std over seeds, the
    95 % CI, and the paired difference against the table's baseline row (kdray/eval/stats.py).
    ``trials``: (row, seed, metrics) per finished trial (:func:`finished_trials`)."""
    by_row: dict[str, dict[int, dict]] = {r: {} for r in table["rows"]}
    for row, seed, metrics in trials:
        by_row[row][seed] = metrics

    def values(row):
        return {s: float(m[metric]) for s, m in sorted(by_row[row].items())
                if isinstance(m.get(metric), (int, float))}

    base_row = baseline_row(table)
    base = values(base_row)
    records = []
    for row, spec in table["rows"].items():
        vals, runs = values(row), [m for _, m in sorted(by_row[row].items())]
        d = stats.describe(list(vals.values()))
        seeds = sorted(set(vals) & set(base))
        vs = (stats.paired([vals[s] for s in seeds], [base[s] for s in seeds])
              if row != base_row else {"diff": math.nan, "ci_lo": math.nan, "ci_hi": math.nan,
                                       "p": math.nan, "resolved": False})
        records.append({
            "row": row, "overrides": json.dumps(spec["set"]),
            **{f"paper_{k}": float(v) for k, v in spec["paper"].items()},
            "metric": metric, "mean": d["mean"], "std": d["std"], "ci95": d["ci95"],
            "seeds": d["n"], "seed_ids": list(vals), "values": list(vals.values()),
            "baseline": base_row, "vs_baseline": vs["diff"], "vs_ci_lo": vs["ci_lo"],
            "vs_ci_hi": vs["ci_hi"], "p": vs["p"], "resolved": vs["resolved"],
            "mlflow_run_ids": [m["mlflow_run_id"] for m in runs]})
    return records


def baseline_row(table: dict) -> str:
    """The row every other row is compared with: the table's ``baseline``, else its first."""
    return table.get("baseline", next(iter(table["rows"])))


def _num(v: float, fmt: str = ".2f") -> str:
    return "-" if math.isnan(v) else format(v, fmt)


def markdown(table: dict, records: list[dict], metric: str) -> str:
    paper = list(next(iter(table["rows"].values()))["paper"])
    head = (["row", "config"] + [f"paper {k}" for k in paper]
            + [f"measured {metric}", "95% CI", "vs baseline", "p", "seeds", "MLflow runs"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [r["row"], ", ".join(f"{k}={v}" for k, v in json.loads(r["overrides"]).items())]
        cells += [f"{r[f'paper_{k}']:g}" for k in paper]
        ci = (f"[{_num(r['mean'] - r['ci95'])}, {_num(r['mean'] + r['ci95'])}]"
              if not math.isnan(r["ci95"]) else "-")
        if r["row"] == r["baseline"]:
            vs = "(baseline)"
        elif math.isnan(r["vs_ci_lo"]):
            vs = f"{_num(r['vs_baseline'], '+.2f')}"
        else:
            vs = (f"{_num(r['vs_baseline'], '+.2f')} [{_num(r['vs_ci_lo'], '+.2f')}, "
                  f"{_num(r['vs_ci_hi'], '+.2f')}]" + (" *" if r["resolved"] else ""))
        cells += [f"{_num(r['mean'])} +- {_num(r['std'])}", ci, vs, _num(r["p"], ".3f"),
                  str(r["seeds"]), " ".join(x[:8] for x in r["mlflow_run_ids"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"mean +- std over seeds; 95% CI: Student t. `vs baseline`: the paired "
              f"difference from row `{records[0]['baseline'] if records else ''}` on the same "
              f"seeds with its 95% CI and the paired t-test's p; * = resolved (the CI excludes "
              f"0). Seed k adds k to {', '.join(SEED_FIELDS)}; the teacher is shared."]
    return "\n".join(lines) + "\n"


def bar_chart(table: dict, records: list[dict], measured: str, path: Path) -> Path:
    """Paper (left) and measured mean with its 95 % CI (right) per row, each axis from 0 (no
    truncated baseline); separate axes, as the scales differ (synthetic data and CPU budgets vs
    the papers' real data). ``measured`` names what the right side measures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = table["metric"]
    rows = [r["row"] for r in records]
    ci = [0.0 if math.isnan(r["ci95"]) else r["ci95"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.4 * len(rows) + 2), 3.8))
    axes[0].bar(rows, [r[f"paper_{key}"] for r in records], color="tab:gray")
    axes[0].set(title=f"paper: {table.get('paper_measure', key)}", ylim=(0, None))
    axes[1].bar(rows, [r["mean"] for r in records], yerr=ci, color="tab:blue", capsize=3)
    axes[1].set(title=f"measured: {measured} (mean, 95% CI)", ylim=(0, None))
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(table["name"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
