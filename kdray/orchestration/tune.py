"""Sweeps: a search space (kdray/orchestration/search_space.py) -> Ray Tune trials.

One trial = one stage run (docs/architecture.md, "Orchestration"). The trial function builds
the stage with the sampled config and fits it: in its Tune actor when the stage uses one worker
(or none), on its own ``TorchTrainer`` (``TuneReportCallback``) when ``ray.num_workers > 1``.
Optuna's TPE samples the define-by-run space; ASHA stops weak trials on the val metric
(``time_attr = epoch``; AP or PCKh is maximised, a ``val_err_*`` joint error minimised) and
keeps its rungs across ``--resume`` (:class:`ResumableASHA`); at most as many trials run at once
as the cluster's CPUs (GPUs) hold.
The Tuner's state lives in ``<out>/tune/``: ``--resume`` restores it (``Tuner.restore``),
finished trials stay finished and an interrupted trial continues from the last checkpoint in its
own folder ``<out>/trials/<trial_id>/``, whose ``attempts.jsonl`` records every start. Each
trial logs to its own MLflow child run of the sweep's parent run.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kdray.config import ExperimentConfig, from_dict, to_dict, with_overrides
from kdray.console import log
from kdray.orchestration import ray_train
from kdray.orchestration.tracking import Tracker, numeric, warn
from kdray.orchestration.search_space import (SearchSpace, define_by_run, make_sampler,
                                               metric_mode)
from kdray.stages import TSD_REFINED

# A GCN trial can read the frozen networks' cached outputs unless it changes what they are.
FROZEN_CHANGERS = ("data.", "teacher.", "student.", "tsd.stage1.", "tsd.stage2.mode",
                   "tsd.stage2.train.seed", "tsd.stage2.train.epochs",
                   "tsd.stage2.train.flip_test", "tsd.stage2.train.labelled")


def uses_frozen_cache(space: SearchSpace) -> bool:
    return space.stage is TSD_REFINED and not any(p.key.startswith(FROZEN_CHANGERS)
                                            for p in space.params)


TRIAL_ACTOR_CPU = 0.01   # a Tune actor that only drives a TorchTrainer ({"CPU": 0} raises)


def trial_resources(cfg: ExperimentConfig, gpu: bool) -> tuple[dict, float, float]:
    """(Tune resources of the trial actor, CPUs a trial occupies, GPUs a trial occupies)."""
    r = cfg.ray
    if r.num_workers > 1:  # the actor only drives its TorchTrainer (docs/operations.md, Tune)
        # ... but holds its CPU share too: 2 workers x 1 CPU next to it do not fit in 2 CPUs
        return ({"CPU": TRIAL_ACTOR_CPU}, r.num_workers * r.cpus_per_worker + TRIAL_ACTOR_CPU,
                r.num_workers * float(gpu))
    res = {"CPU": r.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    return res, r.cpus_per_worker, float(gpu)


def max_concurrent(cluster: dict, cpus: float, gpus: float) -> int:
    """How many trials the cluster's resources run at once."""
    n = int(cluster.get("CPU", 1) // max(cpus, 1e-9))
    if gpus:
        n = min(n, int(cluster.get("GPU", 0) // gpus))
    return max(1, n)


def frozen_outputs(p, inputs: dict) -> Path:
    """The frozen stage-1 student's (and teacher's) outputs on every stage-2 epoch and the val
    set (kdray/data/frozen_cache.py), computed once per (data, student, teacher, augmentation
    schedule) into the stage cache ``p.cache`` and shared by every GCN trial."""
    import dataclasses

    from kdray.config import config_hash
    from kdray.orchestration.pipeline import _lock
    from kdray.stage_run import build_frozen_cache
    cfg, t = p.cfg, p.cfg.tsd.stage2.train
    used = {n: inputs[n] for n in TSD_REFINED.inputs(cfg)}
    key = config_hash("frozen", dataclasses.replace(cfg.data, num_workers=0),
                      {n: r.key for n, r in sorted(used.items())}, t.seed, t.flip_test,
                      t.labelled)
    path = p.cache / f"frozen-{key}"
    with _lock(p.cache / f"frozen-{key}.lock"):
        t0 = time.perf_counter()
        build_frozen_cache(cfg, {n: r.checkpoint for n, r in used.items()}, path)
        log(f"frozen networks' outputs for {t.epochs} epochs in {path} "
            f"({time.perf_counter() - t0:.1f} s)")
    return path


# ----------------------------------------------------------------------------- the trial

def run_trial(config: dict, ctx: dict) -> None:
    """The Tune function trainable: one stage with the sampled overrides."""
    import torch
    from ray import tune

    base = from_dict(ctx["cfg"], "<sweep>")
    space: SearchSpace = ctx["space"]
    cfg = with_overrides(base, space.overrides(config, base), source="<trial>")
    trial_id = tune.get_context().get_trial_id()
    tdir = Path(ctx["out"]) / "trials" / trial_id
    tdir.mkdir(parents=True, exist_ok=True)
    done = tdir / "result.json"
    if done.exists():  # finished, but the sweep was killed before Tune saved that: no rerun
        saved = json.loads(done.read_text())
        tune.report({**numeric(saved["metrics"]), "train_seconds": saved["train_seconds"]})
        return
    _append(tdir / "attempts.jsonl", {"time": time.time(), "pid": os.getpid()})
    run = _trial_run(ctx["tracker"], tdir, trial_id, space, cfg, config)
    torch.set_num_threads(max(1, int(ctx["cpus_per_trial"])))
    inputs = {n: ctx["inputs"][n] for n in space.stage.inputs(cfg)}
    # training seconds over all of the trial's attempts (a resumed trial adds to them)
    seconds_file = tdir / "train_seconds"
    before = float(seconds_file.read_text()) if seconds_file.exists() else 0.0
    metric, t0, reported = ctx["metric"], time.perf_counter(), []

    def seconds() -> float:
        total = before + time.perf_counter() - t0
        seconds_file.write_text(repr(total))
        return total

    def report(metrics: dict, ckpt_dir) -> None:
        clean = numeric(metrics)
        run.log_metrics(clean, step=int(clean.get("epoch", 0)))
        if metric in clean:  # evaluated epochs only: ASHA and Optuna compare the val metric
            reported.append(clean)
            tune.report({**clean, "train_seconds": seconds()})

    if cfg.ray.num_workers > 1:
        from ray.tune.integration.ray_train import TuneReportCallback
        cfg = with_overrides(cfg, {f"{space.stage.train_key}.eval_every": 1})  # every report
        # ray.storage_path when given: on several nodes it is the storage they all reach
        storage = cfg.ray.storage_path or tdir / "ray"
        result = ray_train.fit_on_ray(space.stage, cfg, tdir, inputs, f"train-{trial_id}",
                                   storage, (run.uri, run.run_id),
                                   callbacks=[TuneReportCallback()])
    else:
        from kdray.stage_run import build_stage
        from kdray.train import fit, seed_everything
        seed_everything(space.stage.seed(cfg))
        built = build_stage(space.stage, cfg, inputs, frozen=ctx["frozen"] or None)
        result = fit(built.task, built.train_loader, built.train_cfg, tdir, built.evaluate,
                  report=report)  # resumes from tdir/checkpoints/last.pt by itself
    if not reported and cfg.ray.num_workers <= 1:
        # killed after its last epoch but before Tune saw the trial end: nothing left to train
        tune.report({**numeric(result.metrics), "train_seconds": before})
    total = before if not reported else float(seconds_file.read_text())
    (tdir / "result.json").write_text(json.dumps({"train_seconds": total,
                                                  "metrics": result.metrics}, default=str))
    run.log_metrics({"train_seconds": total})
    run.close()


def _trial_run(sweep: Tracker, tdir: Path, trial_id: str, space: SearchSpace, cfg,
               sampled: dict) -> Tracker:
    """The trial's MLflow child run of the sweep's run: created once, reopened when the trial
    is resumed. Left RUNNING if the trial stops early (:func:`close_trial_runs` closes it)."""
    marker = tdir / "mlflow_run_id"
    if marker.exists():
        return sweep.at(marker.read_text().strip()).reopen()
    from kdray.config import flatten
    run = sweep.run(f"trial-{trial_id}", params=flatten(cfg),
                    tags={"kdray.trial_id": trial_id, "kdray.stage": space.stage.name,
                          "kdray.sampled": json.dumps(sampled, default=str)})
    marker.write_text(run.run_id)
    return run


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_attempts(trial_dir: Path) -> list[dict]:
    path = Path(trial_dir) / "attempts.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------- the sweep

def sweep(space: SearchSpace, cfg: ExperimentConfig, *, out: Path, inputs: dict[str, str],
          frozen: str, tracker: Tracker, metric: str, num_samples: int, resume: bool,
          seed: int = 0):
    """Run (or resume) the Tuner; its ResultGrid. Each trial is a child run of ``tracker``."""
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    ray_train.ensure_ray()
    gpu = ray_train._use_gpu(cfg)
    resources, cpus, gpus = trial_resources(cfg, gpu)
    ctx = {"cfg": to_dict(cfg), "space": space, "out": str(out), "inputs": dict(inputs),
           "frozen": frozen, "tracker": tracker, "metric": metric, "cpus_per_trial": cpus}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    storage, name = out / "tune", "sweep"
    if resume and tune.Tuner.can_restore(str(storage / name)):
        log(f"resuming the sweep in {storage / name}")
        tuner = tune.Tuner.restore(str(storage / name), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
        return fit_quietly(tuner)
    epochs = space.stage.train(cfg).epochs
    concurrent = max_concurrent(ray.cluster_resources(), cpus, gpus)
    mode = metric_mode(metric)
    log(f"sweep over {len(space.params)} parameters of stage {space.stage.name}: {num_samples} "
        f"trials, at most {concurrent} at once, ASHA on {metric} ({mode}imised) over {epochs} "
        f"epochs")
    searcher = OptunaSearch(space=define_by_run(space), metric=metric, mode=mode,
                            sampler=make_sampler(seed),   # the seed lives on the sampler
                            points_to_evaluate=space.grid_points() or None)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, search_alg=searcher, num_samples=num_samples,
            max_concurrent_trials=concurrent,
            # Reused actors save each 1-worker trial its imports. A multi-worker trial's actor
            # owns its TorchTrainer's controller and workers: a trial ASHA stops must take its
            # actor down with it, or its worker group keeps the CPUs the next trial waits for
            # (measured: the next 2-worker trial waited forever in a reused actor).
            reuse_actors=cfg.ray.num_workers <= 1,
            scheduler=ResumableASHA(time_attr="epoch", max_t=epochs,
                                    grace_period=min(epochs, space.stage.train(cfg).eval_every),
                                    reduction_factor=2, stop_last_trials=False)),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                  callbacks=[ProgressTable(metric, space, epochs)]))
    return fit_quietly(tuner)


def _asha_base():
    from ray.tune.schedulers import ASHAScheduler
    return ASHAScheduler


class ResumableASHA(_asha_base()):
    """ASHA as kdray uses it: its rungs survive ``--resume``, and a trial's last epoch is never
    stopped.

    Tune restores the trials of a killed sweep but not its scheduler's state (``Tuner.restore``
    unpickles the scheduler as it was at the start; nothing calls its save/restore), so the
    rungs would start empty and a trial would only be compared with those that report after
    the restart. Each trial that comes back with a history (the ``result.json`` Tune saved
    before the kill) replays it into its bracket: a rung holds each trial's first result at or
    past its milestone, whatever the order of the trials. (A trial resumed in a fresh Ray
    session starts a new ``result.json``; a second ``--resume`` replays what that one holds.)

    ASHA's top rung can be ``max_t`` itself (epochs = grace x 2^k): a stop there would only
    lose the trial's final bookkeeping (its ``result.json``, its MLflow run closed FINISHED),
    so the value is recorded and the trial goes on to finish."""

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and result.get(self._time_attr, 0) >= self._max_t:
            self._num_stopped -= 1
            return self.CONTINUE
        return action

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        if not trial.has_reported_at_least_once:  # a new trial (no folder of its own yet)
            return
        history = next((Path(d) / "result.json" for d in (trial.path, trial.local_path)
                        if d and (Path(d) / "result.json").exists()), None)
        if history is None:
            return
        bracket = self._trial_info[trial.trial_id]
        for line in history.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:      # a line cut short by the kill
                continue
            if isinstance(r.get(self._metric), (int, float)) and self._time_attr in r:
                bracket.on_result(trial, r[self._time_attr], self._metric_op * r[self._metric])


def fit_quietly(tuner):
    """``tuner.fit()`` without Tune's console tables unless ``--verbose``: Tune's newer output
    engine prints its "Configuration for experiment" box and trial tables even at
    ``verbose=0``; its older one, chosen by ``RAY_AIR_NEW_OUTPUT=0``, stays silent there. kdray
    prints its own progress (ProgressTable, ablation.TrialProgress)."""
    from kdray.console import verbose
    if verbose():
        return tuner.fit()
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        return tuner.fit()
    finally:
        if before is None:
            del os.environ["RAY_AIR_NEW_OUTPUT"]
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _progress_table_base():
    from ray.tune import Callback
    return Callback


class ProgressTable(_progress_table_base()):
    """A compact table of the trials on stderr whenever one finishes (or every 30 s)."""

    def __init__(self, metric: str, space: SearchSpace, epochs: int, every_s: float = 30.0):
        self.metric, self.keys, self.every_s = metric, [p.key for p in space.params], every_s
        self.epochs = epochs
        self.last: dict[str, dict] = {}
        self.printed = 0.0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        if time.monotonic() - self.printed > self.every_s:
            self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._print(trials)

    def _print(self, trials) -> None:
        self.printed = time.monotonic()
        short = [k.split(".")[-1] for k in self.keys]
        lines = [f"{'trial':10} {'status':10} {'epoch':>5} {self.metric:>9}  " + " ".join(
            f"{s:>10}" for s in short)]
        done = stopped = 0
        for t in trials:   # a trial restored by --resume: its last result from before
            r = self.last.get(t.trial_id) or t.last_result or {}
            m = r.get(self.metric)
            status = t.status
            # (a sweep started before ProgressTable knew its epochs marks none)
            if status == "TERMINATED" and 0 < int(r.get("epoch", 0)) < getattr(self, "epochs", 0):
                status, stopped = "STOPPED", stopped + 1    # by ASHA, before its last epoch
            else:
                done += status == "TERMINATED"
            vals = [t.config.get(k, "-") for k in self.keys]
            lines.append(f"{t.trial_id:10} {status:10} {int(r.get('epoch', 0)):>5} "
                         f"{m if m is None else round(m, 3)!s:>9}  " + " ".join(
                             f"{_fmt(v):>10}" for v in vals))
        log(f"sweep progress: {done}/{len(trials)} trials finished, {stopped} stopped by ASHA\n"
            + "\n".join(lines))


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def close_trial_runs(p, results) -> dict[str, dict]:
    """Per trial: its MLflow run, training seconds, attempts; runs that ASHA stopped mid-way
    are closed here (the trial function never got to)."""
    trials = {}
    for r in results:
        tid = r.metrics.get("trial_id") or Path(r.path).name.split("_")[2]
        tdir = p.out / "trials" / tid
        marker = tdir / "mlflow_run_id"
        run_id = marker.read_text().strip() if marker.exists() else ""   # "" = failed early
        finished = (tdir / "result.json").exists()
        if r.error is not None:
            warn(f"trial {tid} failed: {str(r.error).splitlines()[-1][:300]}")
        run = p.tracker.at(run_id)
        if run_id and run.status() == "RUNNING":
            run.set_tags({"kdray.early_stopped": "true"})
            run.close("KILLED")
        trials[tid] = {"run_id": run_id, "dir": tdir, "finished": finished,
                       "stopped": bool(run_id) and not finished and r.error is None,
                       "train_seconds": float(r.metrics.get("train_seconds", 0.0)),
                       "attempts": len(read_attempts(tdir))}
    # A sweep killed mid-trial can leave a child run for a trial its last saved Tune state did
    # not hold yet; the resumed sweep samples a replacement, so that run is closed as orphaned.
    known = {t["run_id"] for t in trials.values()}
    for child in p.tracker.children():
        if "kdray.trial_id" in child.data.tags and child.info.run_id not in known:
            run = p.tracker.at(child.info.run_id)
            run.set_tags({"kdray.orphaned": "true"})
            if child.info.status == "RUNNING":
                run.close("KILLED")
    return trials
