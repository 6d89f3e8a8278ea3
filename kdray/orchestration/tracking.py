"""MLflow tracking: the store and the runs (docs/architecture.md, "Orchestration"; the MLflow
facts it relies on: docs/operations.md, "MLflow 3.17"). Models: kdray/orchestration/registry.py.

- Store: ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else a sqlite file
  ``<storage>/mlflow.db``; artifacts of a sqlite store sit beside it in ``mlruns/``. The driver
  creates the database and the experiment (:meth:`Tracker.open`) before any worker writes: 16
  processes creating a fresh sqlite schema at once fail (docs/operations.md, MLflow).
- Runs: a :class:`Tracker` is one run. A pipeline, sweep or ablation table owns a parent run;
  each stage, trial or table row is a child run of it (``mlflow.parentRunId``), each tagged
  with its source, git commit and user; params are the flattened resolved config; per-epoch
  metrics grouped ``train/...`` and ``val/...`` with ``step = epoch`` (the epoch is the step,
  not a metric). A run whose process was killed is closed by the next run of the same pipeline
  and output dir (KILLED, tag ``kdray.orphaned``: :meth:`Tracker.close_orphans`).
"""
from __future__ import annotations

import functools
import getpass
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


# ----------------------------------------------------------------------------- the store

def resolve_uri(uri: str = "", storage: str | Path | None = None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<storage>/mlflow.db``.

    Relative sqlite paths are made absolute against ``storage`` (default: ``$KDRAY_STORAGE``,
    else the CWD), because a Ray job runs in a temporary copy of the working dir that vanishes.
    """
    base = Path(storage or os.environ.get("KDRAY_STORAGE") or Path.cwd()).resolve()
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(base / uri[len('sqlite:///'):]).resolve()}"
    elif "://" not in uri:                     # a bare folder: MLflow's file store is refused
        raise ValueError(f"tracking URI {uri!r}: use sqlite:///PATH.db or http://HOST:PORT")
    return uri


def existing_store(uri: str = "", storage: str | Path | None = None) -> str:
    """:func:`resolve_uri` for commands that only read the store (``kdray registry``, ``kdray
    predict --model models:/...``): a sqlite file or a ``file://`` folder that does not exist is
    a RegistryError naming it, where MLflow would silently create an empty store there."""
    from kdray.orchestration.registry import RegistryError
    try:
        uri = resolve_uri(uri, storage)
    except ValueError as e:
        raise RegistryError(f"{e} (from tracking.uri or $MLFLOW_TRACKING_URI)") from None
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    elif uri.startswith("file://"):
        from urllib.parse import unquote, urlparse
        path = Path(unquote(urlparse(uri).path))
    else:
        return uri                                 # a tracking server: it answers for itself
    if not path.exists():
        raise RegistryError(
            f"no MLflow store at {path} ({uri}): nothing was tracked or registered there; run a "
            f"pipeline first, or point at the store that holds your models with "
            f"$MLFLOW_TRACKING_URI (e.g. sqlite:///PATH/mlflow.db or http://HOST:PORT, the "
            f"pipelines' tracking.uri) or $KDRAY_STORAGE (the folder holding mlflow.db)")
    return uri


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside the database, not in the CWD's ``./mlruns``."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None  # a tracking server decides


EXPERIMENT_NOTE = (
    "kdray: knowledge distillation of top-down SimCC pose estimators (TSD two-stage "
    "distillation, CDKD cross-resolution distillation). One parent run per pipeline or sweep, "
    "one child run per stage or trial; metrics train/... and val/... per epoch (step = epoch); "
    "registered models kdray-* with aliases candidate and champion.")


def quiet_loggers() -> None:
    """MLflow's INFO lines (schema creation, model validation) and its artifact progress bars
    are not kdray's to show, unless ``--verbose``."""
    import logging

    from kdray.console import verbose
    if not verbose():
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def retry(fn, *args, tries: int = 8, **kwargs):
    """sqlite answers 'database is locked' under many writers; back off and try again."""
    for i in range(tries):
        try:
            return fn(*args, **kwargs)
        except MlflowException as e:
            if i == tries - 1 or "locked" not in str(e).lower():
                raise
            time.sleep(0.05 * 2 ** i)


def warn(msg: str) -> None:
    print(f"kdray: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- metrics

TRAIN_KEYS = ("lr", "throughput", "throughput_total", "epoch_seconds")


def numeric(metrics: dict) -> dict[str, float]:
    """The loggable part of a metrics dict: finite-or-NaN numbers (None, strings dropped)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def metric_name(key: str) -> str | None:
    """MLflow's name of a kdray metric: ``val_AP`` -> ``val/AP``, ``loss_kl`` -> ``train/loss_kl``;
    ``epoch`` is the step, not a metric (None); summary metrics keep their names."""
    if key == "epoch":
        return None
    if key.startswith("val_"):
        return "val/" + key[len("val_"):]
    if key.startswith("loss") or key in TRAIN_KEYS:
        return "train/" + key
    return key


def log_metrics(uri: str, run_id: str, metrics: dict, step: int = 0) -> None:
    """Metrics of one step into a run (also what the driver's thread forwarding a Ray worker's
    epochs calls, kdray/orchestration/ray_train.py)."""
    ts = int(time.time() * 1000)
    items = [Metric(name, v, ts, step) for k, v in numeric(metrics).items()
             if not math.isinf(v) and (name := metric_name(k)) is not None]
    client = MlflowClient(uri)
    for i in range(0, len(items), 500):
        retry(client.log_batch, run_id, metrics=items[i:i + 500])


def status_of(exc: BaseException | None) -> str:
    """How a run ends: FINISHED, KILLED (Ctrl-C) or FAILED."""
    return "FINISHED" if exc is None else \
        "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


# ----------------------------------------------------------------------------- runs

class Tracker:
    """One MLflow run: ``Tracker.open(uri, experiment)`` is the store (no run yet),
    :meth:`run` starts a run below this one (a pipeline's parent run from the store, a stage's
    or trial's child run from the parent), :meth:`at` points at an existing one. Three strings,
    so it pickles: a Tune trial gets the sweep's tracker and opens its child run with it.

    ``with tracker.run(name) as run:`` closes the run FINISHED, or FAILED (KILLED on Ctrl-C)
    when the block raises; without ``with``, :meth:`close` ends it.
    """

    def __init__(self, uri: str, experiment_id: str, run_id: str = ""):
        self.uri, self.experiment_id, self.run_id = uri, experiment_id, run_id

    def __repr__(self) -> str:
        return f"Tracker({self.uri!r}, experiment {self.experiment_id}, run {self.run_id or '-'})"

    @classmethod
    def open(cls, uri: str, experiment: str) -> "Tracker":
        """Create the database and the experiment (driver, before any worker)."""
        quiet_loggers()
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(experiment, artifact_location=_artifact_root(uri),
                                                  tags={"mlflow.note.content": EXPERIMENT_NOTE})
            except MlflowException:                 # another process created it first
                exp_id = client.get_experiment_by_name(experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        return cls(uri, exp_id)

    def at(self, run_id: str) -> "Tracker":
        """An existing run of the same store (a resumed trial's, a stage run to log a model into)."""
        return Tracker(self.uri, self.experiment_id, run_id)

    def run(self, name: str, tags: dict | None = None, params: dict | None = None) -> "Tracker":
        """A new run, the child of this one (a top-level run when this is the store)."""
        all_tags = {"mlflow.runName": name, **_source_tags(), **(tags or {})}
        if self.run_id:
            all_tags["mlflow.parentRunId"] = self.run_id
        info = retry(self._client().create_run, self.experiment_id, tags=all_tags,
                     run_name=name).info
        run = self.at(info.run_id)
        if params:
            run.log_params(params)
        return run

    def reopen(self) -> "Tracker":
        """Mark the run RUNNING again (a resumed sweep continues its parent run)."""
        retry(self._client().update_run, self.run_id, status="RUNNING")
        return self

    def close(self, status: str = "FINISHED") -> None:
        retry(self._client().set_terminated, self.run_id, status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(status_of(exc))

    def status(self) -> str:
        return retry(self._client().get_run, self.run_id).info.status

    def children(self) -> list:
        """The child runs (MLflow ``Run`` objects)."""
        return retry(self._client().search_runs, [self.experiment_id],
                     f"tags.mlflow.parentRunId = '{self.run_id}'")

    # -- what goes into the run --------------------------------------------------------------
    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        log_metrics(self.uri, self.run_id, metrics, step)

    def log_history(self, history: list[dict]) -> None:
        """Per-epoch metrics (step = epoch) for every epoch not already logged (workers log live)."""
        done = {m.step for m in retry(self._client().get_metric_history, self.run_id,
                                      "train/loss")}
        for h in history:
            if int(h.get("epoch", 0)) not in done:
                self.log_metrics(h, step=int(h.get("epoch", 0)))

    def log_params(self, params: dict) -> None:
        """Flattened config as params (MLflow takes at most 100 per request, 6000 chars each)."""
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            retry(self._client().log_batch, self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        retry(self._client().log_batch, self.run_id,
              tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, paths: Iterable[str | Path]) -> None:
        """Files into the run (missing ones skipped: e.g. no poses.png without a val set)."""
        client = self._client()
        for p in paths:
            if Path(p).is_file():
                retry(client.log_artifact, self.run_id, str(p))

    def close_orphans(self) -> list[str]:
        """Close this run and its child runs that are still RUNNING although the process that
        owned them is gone (a killed pipeline): status KILLED, tag ``kdray.orphaned``. Their ids."""
        client = self._client()
        try:
            parent = client.get_run(self.run_id)
        except MlflowException:
            return []
        runs = [parent, *retry(client.search_runs, [parent.info.experiment_id],
                               f"tags.mlflow.parentRunId = '{self.run_id}'")]
        closed = []
        for r in runs:
            if r.info.status == "RUNNING":
                run = self.at(r.info.run_id)
                run.set_tags({"kdray.orphaned": "true"})
                run.close("KILLED")
                closed.append(run.run_id)
        return closed

    def _client(self) -> MlflowClient:
        return MlflowClient(self.uri)


@functools.cache
def _source_tags() -> dict[str, str]:
    """What MLflow's fluent API sets when it can see it: the script, the git commit, the user."""
    tags = {"mlflow.source.name": str(Path(sys.argv[0]).resolve()) if sys.argv[0] else "kdray",
            "mlflow.source.type": "LOCAL", "mlflow.user": _user()}
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):   # no passwd entry (some containers)
        return str(os.getuid())
