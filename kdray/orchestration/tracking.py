"""MLflow tracking and model registry (docs/architecture.md, "Orchestration"; the MLflow facts
it relies on: docs/operations.md, "MLflow 3.17").

- Store: ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else a sqlite file
  ``<storage>/mlflow.db``; artifacts of a sqlite store sit beside it in ``mlruns/``. The driver
  creates the database and the experiment (:func:`init_store`) before any worker writes: 16
  processes creating a fresh sqlite schema at once fail (docs/operations.md, MLflow).
- Runs: one parent run per pipeline, one child run per stage (``mlflow.parentRunId``), each
  tagged with its source, git commit and user; params are the flattened resolved config;
  per-epoch metrics grouped ``train/...`` and ``val/...`` with ``step = epoch`` (the epoch is
  the step, not a metric). A run whose process was killed is closed by the next run of the same
  pipeline and output dir (KILLED, tag ``kdray.orphaned``).
- Models: a pyfunc "model from code" (kdray/orchestration/pyfunc_model.py) whose artifact is a
  kdray checkpoint (``state_dict`` + ``meta``) read with ``torch.load(weights_only=True)``;
  never a pickle. Registered under the stage's ``model_name`` (kdray.stages) with aliases ``candidate`` (every new
  version) and ``champion`` (moved only when a version beats the champion on the same val set).
"""
from __future__ import annotations

import contextlib
import functools
import getpass
import io
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from contextlib import contextmanager
from typing import Iterable

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kdray.config import ConfigError, file_hash  # noqa: F401 (file_hash: re-exported)

class RegistryError(ConfigError, LookupError):
    """A model reference (``models:/NAME@ALIAS``) that does not resolve: a wrong input value,
    which ``kdray`` prints as an error like a bad config value. (No torch import here: the
    store's concurrent writers start faster.)"""


CANDIDATE, CHAMPION = "candidate", "champion"
WEIGHTS_FILE = "model.pt"


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


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside the database, not in the CWD's ``./mlruns``."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None  # a tracking server decides


def init_store(uri: str, experiment: str) -> str:
    """Create the database and the experiment (driver, before any worker); its id."""
    quiet_loggers()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=_artifact_root(uri),
                                        tags={"mlflow.note.content": EXPERIMENT_NOTE})
    except MlflowException:                     # another process created it first
        return client.get_experiment_by_name(experiment).experiment_id


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


def _retry(fn, *args, tries: int = 8, **kwargs):
    """sqlite answers 'database is locked' under many writers; back off and try again."""
    for i in range(tries):
        try:
            return fn(*args, **kwargs)
        except MlflowException as e:
            if i == tries - 1 or "locked" not in str(e).lower():
                raise
            time.sleep(0.05 * 2 ** i)


# ----------------------------------------------------------------------------- runs

def start_run(uri: str, experiment_id: str, name: str, parent_id: str | None = None,
              tags: dict | None = None) -> str:
    """A new run (a child run when ``parent_id`` is given); its id. Ended by :func:`end_run`."""
    all_tags = {"mlflow.runName": name, **source_tags(), **(tags or {})}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    run = _retry(MlflowClient(uri).create_run, experiment_id, tags=all_tags, run_name=name)
    return run.info.run_id


@functools.cache
def source_tags() -> dict[str, str]:
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


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again (a resumed sweep continues its parent run)."""
    _retry(MlflowClient(uri).update_run, run_id, status="RUNNING")


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _retry(MlflowClient(uri).set_terminated, run_id, status)


def close_orphans(uri: str, run_id: str) -> list[str]:
    """Close ``run_id`` and its child runs that are still RUNNING although the process that
    owned them is gone (a killed pipeline): status KILLED, tag ``kdray.orphaned``. Their ids."""
    client = MlflowClient(uri)
    try:
        parent = client.get_run(run_id)
    except MlflowException:
        return []
    runs = [parent, *client.search_runs([parent.info.experiment_id],
                                        f"tags.mlflow.parentRunId = '{run_id}'")]
    closed = []
    for run in runs:
        if run.info.status == "RUNNING":
            set_tags(uri, run.info.run_id, {"kdray.orphaned": "true"})
            end_run(uri, run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def numeric(metrics: dict) -> dict[str, float]:
    """The loggable part of a metrics dict: finite-or-NaN numbers (None, strings dropped)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[k] = float(v)
    return out


TRAIN_KEYS = ("lr", "throughput", "throughput_total", "epoch_seconds")


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
    ts = int(time.time() * 1000)
    items = [Metric(name, v, ts, step) for k, v in numeric(metrics).items()
             if not math.isinf(v) and (name := metric_name(k)) is not None]
    client = MlflowClient(uri)
    for i in range(0, len(items), 500):
        _retry(client.log_batch, run_id, metrics=items[i:i + 500])


def log_history(uri: str, run_id: str, history: list[dict]) -> None:
    """Per-epoch metrics (step = epoch) for every epoch not already logged (workers log live)."""
    client = MlflowClient(uri)
    done = {m.step for m in _retry(client.get_metric_history, run_id, "train/loss")}
    for h in history:
        if int(h.get("epoch", 0)) not in done:
            log_metrics(uri, run_id, h, step=int(h.get("epoch", 0)))


def log_params(uri: str, run_id: str, params: dict) -> None:
    """Flattened config as params (MLflow takes at most 100 per request, 6000 chars each)."""
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    client = MlflowClient(uri)
    for i in range(0, len(items), 100):
        _retry(client.log_batch, run_id, params=items[i:i + 100])


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    _retry(MlflowClient(uri).log_batch, run_id,
           tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifacts(uri: str, run_id: str, paths: Iterable[str | Path]) -> None:
    client = MlflowClient(uri)
    for p in paths:
        if Path(p).is_file():
            _retry(client.log_artifact, run_id, str(p))


# ----------------------------------------------------------------------------- models

def export_weights(checkpoint: str | Path, dest: str | Path) -> Path:
    """The deployable part of a training checkpoint (network ``state_dict`` + ``meta``)."""
    import torch

    from kdray.train import load_checkpoint
    state = load_checkpoint(checkpoint)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state["model"], "meta": state["meta"]}, dest)
    return dest


def log_pose_model(uri: str, run_id: str, checkpoint: str | Path, workdir: str | Path):
    """Log a checkpoint as a pyfunc model-from-code with a signature; the ModelInfo."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from kdray.orchestration import pyfunc_model
    weights = export_weights(checkpoint, Path(workdir) / WEIGHTS_FILE)
    meta = _meta_of(weights)
    h, w = meta["input_size"]
    k = int(meta["num_joints"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k, 3))]))
    example = np.full((1, h, w, 3), 127, np.uint8)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    before = client.get_run(run_id).info
    try:
        with mlflow.start_run(run_id=run_id), _quiet_mlflow():
            return mlflow.pyfunc.log_model(
                name="model", python_model=pyfunc_model.__file__,
                artifacts={pyfunc_model.WEIGHTS: str(weights)}, signature=signature,
                input_example=example, pip_requirements=requirements(),
                code_paths=[str(Path(pyfunc_model.__file__).resolve().parents[1])],  # kdray/
                metadata={"kdray_stage": meta.get("stage", ""), "input_size": [h, w]})
    finally:
        # Logging into a finished run reopens it; put back its status and end time, so the run
        # still shows how long the stage trained, not when its model was registered.
        if before.status != "RUNNING":
            _retry(client.set_terminated, run_id, before.status, before.end_time)


def _meta_of(weights: Path) -> dict:
    import torch
    return torch.load(weights, map_location="cpu", weights_only=True)["meta"]


# What the registered model needs beside kdray itself, whose source travels with the model
# (``code_paths``: MLflow puts it on sys.path when the model loads), so the model loads in an
# environment without kdray installed.
MODEL_REQUIREMENTS = ("mlflow", "torch", "timm", "numpy", "opencv-python-headless", "PyYAML",
                      "safetensors")


def requirements() -> list[str]:
    """Pinned to this environment's versions, without MLflow's 5-7 s pip inference."""
    from importlib.metadata import version
    return [f"{p}=={version(p)}" for p in MODEL_REQUIREMENTS if _installed(p)]


@contextmanager
def _quiet_mlflow():
    """MLflow's INFO lines, artifact progress bars and the type-hint advice for ``predict``
    (our signature is explicit) are chatter unless ``--verbose``."""
    from kdray.console import quiet_stdout, verbose
    if verbose():
        yield
        return
    with warnings.catch_warnings(), quiet_stdout(), \
            contextlib.redirect_stderr(io.StringIO()):  # "Successfully registered model ..."
        warnings.filterwarnings("ignore", message=".*Add type hints", category=UserWarning)
        yield


def _installed(pkg: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        version(pkg)
        return True
    except PackageNotFoundError:
        return False


def find_version(uri: str, name: str, stage_key: str) -> str | None:
    """The newest version of ``name`` registered from the stage output ``stage_key``."""
    client = MlflowClient(uri, registry_uri=uri)
    found = _retry(client.search_model_versions, f"name='{name}' and tags.stage_key='{stage_key}'")
    return str(max(int(v.version) for v in found)) if found else None


def register(uri: str, name: str, model_uri: str | None, *, run_id: str, stage_key: str,
             val_set: str, metric: str, value: float, promote: bool = True,
             description: str = "", model_description: str = "") -> dict:
    """Register a logged model; alias ``candidate``; ``champion`` if it beats the champion
    (never with ``promote=False``: a sweep's best trial stays a candidate).

    The champion is compared on the same val set only (tag ``val_set``, a hash of the val
    annotations): a version scored on other data neither replaces it nor is replaced.
    """
    client = MlflowClient(uri, registry_uri=uri)
    version = find_version(uri, name, stage_key)
    if version is None:                # else: the same stage output was registered before
        if not model_uri:
            raise ValueError(f"{name}: no logged model to register for stage {stage_key}")
        mlflow.set_registry_uri(uri)
        with _quiet_mlflow():
            mv = mlflow.register_model(model_uri, name, tags={
                "stage_key": stage_key, "val_set": val_set, "metric": metric,
                "metric_value": repr(float(value)), "run_id": run_id})
        version = mv.version
        text = description or f"kdray stage {stage_key}"
        _retry(client.update_model_version, name, version,
               f"{text}; {metric} {value:.2f} on val set {val_set}; stage key {stage_key}")
        if not _retry(client.get_registered_model, name).description:
            _retry(client.update_registered_model, name, model_description)
    version = str(version)
    _retry(client.set_registered_model_alias, name, CANDIDATE, version)
    champion = _alias_version(client, name, CHAMPION)
    is_champion = champion is not None and str(champion.version) == version
    if promote and (champion is None or (not is_champion
                                         and _beats(value, metric, val_set, champion))):
        _retry(client.set_registered_model_alias, name, CHAMPION, version)
        is_champion = True
    return {"name": name, "version": version, "champion": is_champion,
            "uri": f"models:/{name}/{version}"}


def _beats(value: float, metric: str, val_set: str, champion) -> bool:
    """Better than the champion on the same val set and metric (higher AP / PCKh is better)."""
    tags = champion.tags or {}
    if tags.get("val_set") != val_set or tags.get("metric") != metric:
        return False
    return float(value) > float(tags.get("metric_value", "-inf"))


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS``, ``NAME@ALIAS``, ``NAME/VERSION`` -> (name, alias, version)."""
    ref = ref[len("models:/"):] if ref.startswith("models:/") else ref
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return name, None, version
    raise RegistryError(f"model reference {ref!r}: expected NAME@ALIAS or NAME/VERSION")


def _version(client: MlflowClient, ref: str):
    name, alias, version = _parse_ref(ref)
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise RegistryError(f"{ref}: not in the registry at {client.tracking_uri} "
                          f"({str(e).splitlines()[0]})") from None


def download_weights(ref: str, dest: str | Path, uri: str = "") -> Path:
    """The weights file of a registered model (``models:/NAME@ALIAS``), copied under ``dest``.

    Reads the artifact path from the ``MLmodel`` file (YAML), so no model code runs.
    """
    uri = resolve_uri(uri)
    quiet_loggers()
    client = MlflowClient(uri, registry_uri=uri)
    mv = _version(client, ref)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(dest)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    rel = mlmodel["flavors"]["python_function"]["artifacts"]["weights"]["path"]
    return local / rel


def load_registered(ref: str, uri: str = ""):
    """(network in eval mode, meta) of ``models:/NAME@ALIAS``: ``kdray predict --model``."""
    import tempfile

    from kdray.inference import model_from_checkpoint
    with tempfile.TemporaryDirectory(prefix="kdray-model-") as tmp:
        return model_from_checkpoint(download_weights(ref, tmp, uri))


def _describe(client: MlflowClient, mv) -> dict:
    aliases = list(getattr(mv, "aliases", []) or [])
    out = {"name": mv.name, "version": mv.version, "aliases": aliases, "run_id": mv.run_id,
           "source": mv.source, "status": mv.status, "tags": dict(mv.tags or {}),
           "created": mv.creation_timestamp}
    if mv.run_id:
        try:
            out["metrics"] = client.get_run(mv.run_id).data.metrics
        except MlflowException:
            pass
    return out


def list_models(uri: str = "") -> list[dict]:
    """Registered kdray models: name, aliases -> version, latest version."""
    uri = resolve_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    out = []
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name='{rm.name}'")
        out.append({"name": rm.name, "aliases": dict(rm.aliases or {}),
                    "latest_version": max((int(v.version) for v in versions), default=None),
                    "versions": len(versions)})
    return sorted(out, key=lambda m: m["name"])


def show_model(ref: str, uri: str = "") -> dict:
    """One version (``NAME@ALIAS`` or ``NAME/VERSION``): tags, run, metrics, aliases."""
    uri = resolve_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    mv = _version(client, ref)
    info = _describe(client, mv)
    rm = client.get_registered_model(mv.name)
    info["aliases"] = sorted(a for a, v in (rm.aliases or {}).items() if str(v) == str(mv.version))
    return info


def warn(msg: str) -> None:
    print(f"kdray: {msg}", file=sys.stderr, flush=True)


def existing_store(uri: str = "", storage: str | Path | None = None) -> str:
    """:func:`resolve_uri` for commands that only read the store (``kdray registry``, ``kdray
    predict --model models:/...``): a sqlite file or a ``file://`` folder that does not exist is
    a RegistryError naming it, where MLflow would silently create an empty store there."""
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
