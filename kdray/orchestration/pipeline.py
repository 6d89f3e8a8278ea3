"""Pipelines as plain driver code: stages keyed by config hash, reused when done, resumed when not.

A pipeline (pipelines/two_stage.py, pipelines/cdkd.py) is a :class:`Pipeline` context and a few
calls to :meth:`Pipeline.stage`; the DAG is the order of the calls and the results they pass on
(Ray Workflows is gone: docs/operations.md, "Pipelines and Ray jobs"). A stage's key hashes
only what changes its output:

    teacher   teacher section + data
    student   student section (+ tsd.stage1 and the teacher's key when a KD term is on; the
              undistilled baseline does not depend on the teacher)
    gcn       tsd.stage2 + student model + data + the keys of its student (and teacher)
    cdkd      cdkd section + data + the teacher's key

Its files live in ``<cache>/<stage>-<key>/`` (checkpoints/last.pt, metrics.json,
loss_curve.png, poses.png, config.yaml, attempts.jsonl) and its Ray Train run in
``<cache>/ray/<stage>-<key>/``. ``stage.json`` there marks it done: a later run (any pipeline,
any TSD/CDKD setting) reuses it; an interrupted one resumes from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kdray.config import (ExperimentConfig, config_hash, dump_yaml, file_hash, flatten,
                          with_overrides)
from kdray.orchestration.args import parse_args  # noqa: F401 (the pipelines' import point)
from kdray.console import log
from kdray.orchestration import ray_train, registry, tracking
from kdray.orchestration.tracking import Tracker, status_of
from kdray.progress import ConsoleProgress, clock
from kdray.vis import pose_sheet
from kdray.stage_run import METRIC, ensure_data
from kdray.stages import STAGES, TEACHER, Stage


@dataclass(frozen=True)
class StageResult:
    """A finished stage (docs/architecture.md, "Contracts"): what downstream stages and the
    registry need."""
    stage: str
    key: str                 # config hash: the cache key
    checkpoint: str          # absolute path of the checkpoint (last.pt)
    run_id: str              # the MLflow run that trained it ("" for a given checkpoint)
    metrics: dict = field(default_factory=dict)   # final epoch: losses, val_* metrics
    out_dir: str = ""
    wall_seconds: float = 0.0
    reused: bool = False




# ----------------------------------------------------------------------------- keys

def stage_key(stage: Stage, cfg: ExperimentConfig, input_keys: dict[str, str]) -> str:
    """Hash of the stage's sections, the data config and its inputs' keys (not the whole config:
    loader workers, tracking and Ray settings do not change what a stage produces)."""
    data = dataclasses.replace(cfg.data, num_workers=0)
    return config_hash(stage.name, *stage.sections(cfg).values(), data,
                       dict(sorted(input_keys.items())))


def resolve_config(cfg: ExperimentConfig, storage: Path) -> ExperimentConfig:
    """Relative data paths are resolved against the storage dir, not a job's temporary CWD."""
    if Path(cfg.data.root).is_absolute():
        return cfg
    return with_overrides(cfg, {"data.root": str((storage / cfg.data.root).resolve())})


def baseline_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The undistilled student: TSD stage 1 with every KD term off."""
    return with_overrides(cfg, {"tsd.stage1.feature": False, "tsd.stage1.pose": False,
                                "tsd.stage1.structure": False})


def primary_metric(cfg: ExperimentConfig) -> str:
    return "val_Mean" if METRIC[cfg.data.dataset] == "pckh" else "val_AP"


# ----------------------------------------------------------------------------- the pipeline

class Pipeline:
    """One pipeline run: MLflow parent run (``p.tracker``), stage cache, Ray, summary.

    ``with Pipeline("two_stage", cfg, args) as p:`` ... ``p.stage(...)`` ... ``p.finish(...)``.
    ``tracker``: an open run to put the stage runs under instead, for a Pipeline used without
    ``with`` (an ablation row inside a Tune trial: kdray/orchestration/ablation.py).
    """

    def __init__(self, name: str, cfg: ExperimentConfig, args: argparse.Namespace,
                 stages: int = 0, tracker: Tracker | None = None):
        self.name = name
        self.planned = stages          # how many stages the pipeline runs: "stage k/N", its ETA
        self._walls: list[float] = []  # wall seconds of the stages trained so far
        self._t0 = time.monotonic()
        self.storage = Path(args.storage or os.environ.get("KDRAY_STORAGE") or Path.cwd()).resolve()
        self.cfg = resolve_config(cfg, self.storage)
        # Relative --out/--cache are under the storage dir too (a job's CWD is a temp copy).
        self.out = (self.storage / (args.out or Path("runs") / name)).resolve()
        self.cache = (self.storage / (args.cache or Path("runs") / "stages")).resolve()
        # Ray Train's run storage: a shared folder or a URI (s3://...) on multi-node clusters.
        ray_storage = self.cfg.ray.storage_path or str(self.cache / "ray")
        self.ray_storage = ray_storage if "://" in ray_storage else \
            str((self.storage / ray_storage).resolve())
        self.uri = tracker.uri if tracker else tracking.resolve_uri(self.cfg.tracking.uri,
                                                                    self.storage)
        self.tracker = tracker            # the parent run of the stage runs; set on entering
        self.results: dict[str, StageResult] = {}
        self.registered: dict[str, dict] = {}
        self._child_runs: dict[tuple[str, str], str] = {}   # (stage, key) -> this run's child
        self._resume_run = ""
        self.expected: float | None = None   # seconds, from expect()

    @property
    def run_id(self) -> str:
        """The MLflow parent run's id ("" before entering)."""
        return self.tracker.run_id if self.tracker else ""

    def resume(self, run_id: str) -> "Pipeline":
        """Continue the parent run ``run_id`` on entering, instead of starting one (a resumed
        sweep); "" starts one."""
        self._resume_run = run_id
        return self

    # -- context: the parent run -------------------------------------------------------------
    def __enter__(self) -> "Pipeline":
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self._claim = _claim_out_dir(self.out)   # held until __exit__
        store = Tracker.open(self.uri, self.cfg.tracking.experiment)
        self._close_orphans(store)
        if self._resume_run:
            self.tracker = store.at(self._resume_run).reopen()
        else:
            self.tracker = store.run(self.name, tags={"kdray.pipeline": self.name,
                                                      "kdray.out_dir": str(self.out)},
                                     params=flatten(self.cfg))
        (self.out / RUN_FILE).write_text(json.dumps({"run_id": self.run_id, "uri": self.uri,
                                                     "pid": os.getpid()}))
        dump_yaml(self.cfg, self.out / "config.yaml")
        self.tracker.log_artifacts([self.out / "config.yaml"])
        log(f"{self.name}: out {self.out}, stage cache {self.cache}, MLflow {self.uri} "
            f"(run {self.run_id})")
        ensure_data(self.cfg)  # on the driver, before workers read it
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.tracker.close(status_of(exc))
            ray_train.shutdown_ray()  # Ray starts on the first stage that trains
        finally:
            self._claim.close()

    def _close_orphans(self, store: Tracker) -> None:
        """The previous run of this pipeline in this output dir was killed (SIGKILL, a lost
        machine) if its MLflow runs still say RUNNING: we hold the dir's lock, so its process
        is gone. Close them as KILLED (tag ``kdray.orphaned``) before starting afresh."""
        path = self.out / RUN_FILE
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if previous.get("uri") != self.uri or previous.get("run_id") in ("", self._resume_run):
            return
        closed = store.at(previous["run_id"]).close_orphans()
        if closed:
            log(f"closed {len(closed)} MLflow run(s) of a killed earlier run as KILLED: "
                f"{', '.join(closed)}")

    # -- stages ------------------------------------------------------------------------------
    def expect(self, plan: list[tuple[Stage, ExperimentConfig | None]]) -> float:
        """Say before the first stage how long the stages of ``plan`` (stage, config or None
        for the pipeline's) will take on this machine, from a few timed steps of each network
        (kdray/orchestration/estimate.py), after checking that each can run (``Stage.check``).
        Returns the seconds."""
        from kdray.orchestration.estimate import expected_seconds
        plan = [(s, self.cfg if c is None else resolve_config(c, self.storage)) for s, c in plan]
        for s, c in plan:
            s.check(c)
        secs = expected_seconds(plan, *_persons(self.cfg))
        self.expected = sum(secs)
        parts = ", ".join(f"{s.name} ~{clock(x)}" for (s, _), x in zip(plan, secs))
        log(f"{self.name}: expected ~{clock(self.expected)} on this machine ({parts}; measured "
            f"from a few training steps; a stage already in the cache takes none)")
        return self.expected

    def stage(self, stage: Stage, cfg: ExperimentConfig | None = None, label: str | None = None,
              **inputs: StageResult) -> StageResult:
        """Run ``stage`` (or reuse it); ``inputs`` are upstream results (teacher=, student=)."""
        cfg = resolve_config(cfg, self.storage) if cfg is not None else self.cfg
        label = label or stage.name
        needed = stage.inputs(cfg)
        missing = [n for n in needed if n not in inputs]
        if missing:
            raise ValueError(f"stage {label!r} needs {missing}")
        used = {n: inputs[n] for n in needed}  # e.g. the baseline ignores a given teacher
        key = stage_key(stage, cfg, {n: r.key for n, r in used.items()})
        stage_dir = self.cache / f"{stage.name}-{key}"
        self._index = len(self.results) + 1
        with _lock(self.cache / f"{stage.name}-{key}.lock"):
            done = _read_marker(stage_dir)
            if done is not None:
                result = self._reuse(label, done)
            else:
                result = self._train(stage, label, cfg, key, stage_dir, used)
        self.results[label] = result
        return result

    def _head(self, label: str) -> str:
        return f"stage {self._index}/{self.planned} {label}" if self.planned else label

    def _rest(self, eta: float) -> float:
        """Seconds the stages after the current one will take: the mean of those trained so
        far, else the current stage's own projected length (a rough guide, shown with ~)."""
        left = max(0, self.planned - self._index)
        per = (sum(self._walls) / len(self._walls) if self._walls
               else time.monotonic() - self._stage_t0 + eta)
        return left * per

    def _train(self, stage, label, cfg, key, stage_dir, used) -> StageResult:
        resumed = (stage_dir / "attempts.jsonl").exists()
        log(f"{self._head(label)}: {'resuming' if resumed else 'training'} stage {stage.name} "
            f"(key {key}) in {stage_dir}")
        self._stage_t0 = time.monotonic()
        progress = ConsoleProgress(label, self._index, self.planned, self._rest)
        with self.tracker.run(label, tags={"kdray.stage": stage.name, "kdray.stage_key": key,
                                           "kdray.label": label}, params=flatten(cfg)) as run:
            t0 = time.perf_counter()
            try:
                fit = ray_train.train_stage(stage, cfg, stage_dir,
                                            {n: r.checkpoint for n, r in used.items()},
                                            run_name=f"{stage.name}-{key}",
                                            storage_path=self.ray_storage,
                                            mlflow=(run.uri, run.run_id), progress=progress)
            finally:
                progress.clear()
            wall = time.perf_counter() - t0
            self._walls.append(wall)
            run.log_history(fit.history)
            pose_sheet(fit.checkpoint, cfg, stage_dir / "poses.png")
            run.log_artifacts([stage_dir / n for n in ("config.yaml", "metrics.json",
                                                       "loss_curve.png", "poses.png")])
            run.log_metrics({"wall_seconds": wall})
        self._child_runs[(stage.name, key)] = run.run_id
        result = StageResult(stage.name, key, str(fit.checkpoint), run.run_id, fit.metrics,
                             str(stage_dir), wall)
        _write_marker(stage_dir, result)
        log(f"{self._head(label)}: done in {clock(wall)}, {_brief(result.metrics)}")
        return result

    def _reuse(self, label: str, done: StageResult) -> StageResult:
        log(f"{self._head(label)}: reused finished stage {done.stage} (key {done.key}, trained "
            f"in MLflow run {done.run_id or '-'}) from {done.out_dir}")
        with self.tracker.run(label, tags={"kdray.stage": done.stage, "kdray.stage_key": done.key,
                                           "kdray.label": label, "kdray.reused": "true",
                                           "kdray.trained_run_id": done.run_id}) as run:
            run.log_metrics(done.metrics, step=int(done.metrics.get("epoch", 0)))
        self._child_runs[(done.stage, done.key)] = run.run_id
        return dataclasses.replace(done, reused=True)

    def teacher(self, given: str | None = None) -> StageResult:
        """The teacher: trained (once per teacher config), or a checkpoint path or
        ``models:/NAME@ALIAS`` given on the command line."""
        if not given:
            return self.stage(TEACHER)
        metrics: dict = {}
        if given.startswith("models:/"):
            path = registry.download_weights(given, self.out / "given_teacher", self.uri)
            tags = registry.show_model(given, self.uri)["tags"]
            if "metric_value" in tags:  # the val score it was registered with
                metrics[tags["metric"]] = float(tags["metric_value"])
        else:
            path = Path(given).resolve()
            if path.is_dir():
                path = path / "last.pt" if (path / "last.pt").exists() else \
                    path / "checkpoints" / "last.pt"
        from kdray.train import load_checkpoint
        state = load_checkpoint(path)  # fails early, naming the file, if it is not one
        metrics = {**(state.get("history") or [{}])[-1], **metrics}
        log(f"teacher: given {given} -> {path}")
        with self.tracker.run("teacher", tags={"kdray.stage": "teacher", "kdray.label": "teacher",
                                               "kdray.given": given}) as run:
            run.log_metrics(metrics)
        result = StageResult("teacher", file_hash(path), str(path), "", metrics,
                             str(path.parent), 0.0, True)
        self.results["teacher"] = result
        return result

    def adopt(self, stage: Stage, cfg: ExperimentConfig, out_dir: str | Path, run_id: str,
              metrics: dict, **inputs: StageResult) -> StageResult:
        """A stage trained outside the stage cache (a sweep's trial, in MLflow run ``run_id``;
        ``out_dir`` holds its checkpoints/last.pt as a stage dir does), keyed as :meth:`stage`
        keys it, so that :meth:`register` treats it as that stage's output."""
        key = stage_key(stage, cfg, {n: inputs[n].key for n in stage.inputs(cfg)})
        return StageResult(stage.name, key, str(Path(out_dir) / "checkpoints" / "last.pt"),
                           run_id, metrics, str(out_dir))

    # -- registry ----------------------------------------------------------------------------
    def register(self, result: StageResult, metric: str = "", promote: bool = True,
                 description: str = "") -> dict | None:
        """Register ``result``'s model (kdray/orchestration/registry.py, ``register_stage``),
        logged into this pipeline's child run of the stage: alias ``candidate``; ``champion``
        if it beats the champion's ``metric`` (default: the dataset's primary val metric) on
        the same val set, unless ``promote=False``."""
        if not self.cfg.tracking.register or not result.run_id:  # a given teacher: not ours
            return None
        metric = metric or primary_metric(self.cfg)
        value = result.metrics.get(metric)
        if not isinstance(value, (int, float)):
            log(f"{result.stage}: no {metric} to rank it by; not registered")
            return None
        data = self.cfg.data
        run = self.tracker.at(self._child_runs.get((result.stage, result.key), result.run_id))
        reg = registry.register_stage(
            run, STAGES[result.stage], result.key, result.checkpoint, trained_in=result.run_id,
            val_set=file_hash(Path(data.root) / data.val_ann), metric=metric,
            value=float(value), promote=promote,
            description=description or (f"{self.name} pipeline, stage {result.stage} "
                                        f"({result.out_dir}); data {data.dataset} at "
                                        f"{data.root}"))
        self.registered[reg["name"]] = reg
        log(f"registered {reg['name']} version {reg['version']} ({metric} {value:.2f})"
            f"{', champion' if reg['champion'] else ''}")
        return reg

    # -- the end -----------------------------------------------------------------------------
    def stage_metrics(self, runs: dict[str, StageResult]) -> dict:
        """The summary's per-stage numbers: ``<metric>_<label>`` (AP or PCKh Mean),
        ``seconds_<label>`` and ``reused_<label>`` for each of ``runs``."""
        m = primary_metric(self.cfg)
        name = m.removeprefix("val_")
        out = {f"{name}_{k}": r.metrics.get(m) for k, r in runs.items()}
        out.update({f"seconds_{k}": round(r.wall_seconds, 1) for k, r in runs.items()})
        out.update({f"reused_{k}": float(r.reused) for k, r in runs.items()})
        return out

    def finish(self, metrics: dict, outputs: dict | None = None) -> dict:
        """Print the one summary JSON line and write ``summary.json`` (docs/architecture.md,
        "Command-line contract")."""
        outputs = {"out_dir": str(self.out), "cache": str(self.cache), "mlflow_uri": self.uri,
                   "stages": {k: r.checkpoint for k, r in self.results.items()},
                   "models": {k: f"models:/{k}/{v['version']}"
                              for k, v in self.registered.items()}, **(outputs or {})}
        summary = {"pipeline": self.name, "mlflow_run_id": self.run_id, "metrics": metrics,
                   "outputs": outputs}
        self.tracker.log_metrics(metrics)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        self.tracker.log_artifacts([self.out / "summary.json"])
        print(self.table(), file=sys.stderr, flush=True)
        print(json.dumps(summary), flush=True)
        return summary

    def table(self) -> str:
        """The end of the console: each stage's metrics, where its model was registered, and
        how to look at the runs."""
        metric = primary_metric(self.cfg)
        rows = [("stage", "kind", metric.removeprefix("val_"), "occl. err", "time", "")]
        for label, r in self.results.items():
            m = r.metrics
            rows.append((label, r.stage, _num(m.get(metric)), _num(m.get("val_err_occluded")),
                         "-" if r.reused else clock(r.wall_seconds),
                         "reused" if r.reused else "trained"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        expected = f" (expected ~{clock(self.expected)})" if self.expected else ""
        lines = [f"[kdray] {self.name} finished in {clock(time.monotonic() - self._t0)}{expected}"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                  for row in rows]
        for name, reg in self.registered.items():
            lines.append(f"  registered {reg['uri']}" +
                         (" (champion)" if reg["champion"] else " (candidate)"))
        ui = f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1"
        lines.append(f"  MLflow run {self.run_id}: {ui}")
        return "\n".join(lines)


def _persons(cfg: ExperimentConfig) -> tuple[int, int, int]:
    """(train persons, val persons, joints): SynthPose's from its config (check_generated holds
    the files to it), a real dataset's by reading its annotations."""
    from kdray.data.keypoints import spec_for
    d = cfg.data
    if d.dataset == "synthpose":
        train = min(d.synth.train, d.max_train) if d.max_train else d.synth.train
        return train, d.synth.val, spec_for(d.dataset).num_joints
    from kdray.stage_run import load_records
    train, val, spec = load_records(cfg)
    return len(train), len(val), spec.num_joints


def _num(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def _brief(metrics: dict) -> str:
    keys = ("val_AP", "val_Mean", "val_err_occluded", "loss")
    return ", ".join(f"{k} {metrics[k]:.3g}" for k in keys if isinstance(metrics.get(k), float))


# ----------------------------------------------------------------------------- markers

RUN_FILE = "mlflow_run.json"   # in a pipeline's output dir: the MLflow run of its latest run


def _claim_out_dir(out: Path):
    """An exclusive lock on ``out`` for this process's lifetime (released by the OS if it is
    killed); a second pipeline on the same output dir stops with a clear error instead."""
    from kdray.config import ConfigError
    f = open(out / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"{out}: another pipeline is running with this output dir; wait for "
                          f"it or give another --out") from None
    return f


def _read_marker(stage_dir: Path) -> StageResult | None:
    path = stage_dir / "stage.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if not Path(data["checkpoint"]).exists():
        log(f"{path}: its checkpoint is gone; training the stage again")
        return None
    return StageResult(**data)


def _write_marker(stage_dir: Path, result: StageResult) -> None:
    tmp = stage_dir / "stage.json.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(result), indent=1, default=str))
    os.replace(tmp, stage_dir / "stage.json")


@contextmanager
def _lock(path: Path):
    """One process per stage at a time (parallel pipelines sharing a cache wait, then reuse)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
