"""The MLflow model registry: how a stage's model gets in, and how it is read back
(docs/architecture.md, "Orchestration"; the MLflow facts: docs/operations.md, "MLflow 3.17").

- In: :func:`register_stage`, the one way (every pipeline's stages through
  ``Pipeline.register``, a sweep's best trial the same way). The model is a pyfunc "model from
  code" (kdray/orchestration/pyfunc_model.py) whose artifact is a kdray checkpoint
  (``state_dict`` + ``meta``) read with ``torch.load(weights_only=True)``; never a pickle.
  Registered under the stage kind's ``model_name`` (kdray.stages) with aliases ``candidate``
  (every new version) and ``champion`` (moved only when a version beats the champion on the
  same val set).
- Out: ``kdray predict --model models:/NAME@ALIAS`` (:func:`load_registered`), ``kdray registry
  list|show`` (:func:`list_models`, :func:`show_model`), a pipeline's ``--teacher
  models:/...`` (:func:`download_weights`).
"""
from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kdray.config import ConfigError
from kdray.orchestration.tracking import Tracker, quiet_loggers, resolve_uri, retry


class RegistryError(ConfigError, LookupError):
    """A model reference (``models:/NAME@ALIAS``) that does not resolve: a wrong input value,
    which ``kdray`` prints as an error like a bad config value. (No torch import here: the
    store's concurrent writers start faster.)"""


CANDIDATE, CHAMPION = "candidate", "champion"
WEIGHTS_FILE = "model.pt"


# ----------------------------------------------------------------------------- in

def register_stage(run: Tracker, kind, key: str, checkpoint: str | Path, *, trained_in: str,
                   val_set: str, metric: str, value: float, promote: bool = True,
                   description: str = "") -> dict:
    """Register the model of stage output ``key`` (a ``kind`` from kdray.stages): log
    ``checkpoint`` as a pyfunc model into ``run`` unless the registry already holds a version of
    this output (tag ``stage_key``: a reused stage adds no version), register it under
    ``kind.model_name``, alias ``candidate``; ``champion`` if it beats the champion (never with
    ``promote=False``: a sweep's best trial stays a candidate). ``trained_in``: the run that
    trained it; ``val_set``: a hash of the val annotations ``value`` was scored on.

    The champion is compared on the same val set only: a version scored on other data neither
    replaces it nor is replaced. Returns ``{name, version, champion, uri}``.
    """
    name = kind.model_name
    client = MlflowClient(run.uri, registry_uri=run.uri)
    version = find_version(run.uri, name, key)
    if version is None:
        with tempfile.TemporaryDirectory(prefix="kdray-export-") as tmp:
            model_uri = _log_pose_model(run, checkpoint, tmp).model_uri
        mlflow.set_registry_uri(run.uri)
        with _quiet_mlflow():
            version = mlflow.register_model(model_uri, name, tags={
                "stage_key": key, "val_set": val_set, "metric": metric,
                "metric_value": repr(float(value)), "run_id": trained_in}).version
        retry(client.update_model_version, name, version,
              f"{description or f'kdray stage {key}'}; {metric} {value:.2f} on val set "
              f"{val_set}; stage key {key}")
        if not retry(client.get_registered_model, name).description:
            retry(client.update_registered_model, name, kind.description)
    version = str(version)
    retry(client.set_registered_model_alias, name, CANDIDATE, version)
    champion = _alias_version(client, name, CHAMPION)
    is_champion = champion is not None and str(champion.version) == version
    if promote and (champion is None or (not is_champion
                                         and _beats(value, metric, val_set, champion))):
        retry(client.set_registered_model_alias, name, CHAMPION, version)
        is_champion = True
    return {"name": name, "version": version, "champion": is_champion,
            "uri": f"models:/{name}/{version}"}


def find_version(uri: str, name: str, stage_key: str) -> str | None:
    """The newest version of ``name`` registered from the stage output ``stage_key``."""
    client = MlflowClient(uri, registry_uri=uri)
    found = retry(client.search_model_versions, f"name='{name}' and tags.stage_key='{stage_key}'")
    return str(max(int(v.version) for v in found)) if found else None


def _beats(value: float, metric: str, val_set: str, champion) -> bool:
    """Better than the champion on the same val set and metric (higher AP / PCKh, lower joint
    error: search_space.metric_mode)."""
    from kdray.orchestration.search_space import metric_mode
    tags = champion.tags or {}
    if tags.get("val_set") != val_set or tags.get("metric") != metric:
        return False
    if metric_mode(metric) == "min":
        return float(value) < float(tags.get("metric_value", "inf"))
    return float(value) > float(tags.get("metric_value", "-inf"))


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def export_weights(checkpoint: str | Path, dest: str | Path) -> Path:
    """The deployable part of a training checkpoint (network ``state_dict`` + ``meta``)."""
    import torch

    from kdray.train import load_checkpoint
    state = load_checkpoint(checkpoint)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state["model"], "meta": state["meta"]}, dest)
    return dest


def _log_pose_model(run: Tracker, checkpoint: str | Path, workdir: str | Path):
    """Log a checkpoint into ``run`` as a pyfunc model-from-code with a signature; the
    ModelInfo."""
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from kdray.orchestration import pyfunc_model
    weights = export_weights(checkpoint, Path(workdir) / WEIGHTS_FILE)
    meta = torch.load(weights, map_location="cpu", weights_only=True)["meta"]
    h, w = meta["input_size"]
    k = int(meta["num_joints"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k, 3))]))
    example = np.full((1, h, w, 3), 127, np.uint8)
    mlflow.set_tracking_uri(run.uri)
    client = MlflowClient(run.uri)
    before = client.get_run(run.run_id).info
    try:
        with mlflow.start_run(run_id=run.run_id), _quiet_mlflow():
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
            retry(client.set_terminated, run.run_id, before.status, before.end_time)


# What the registered model needs beside kdray itself, whose source travels with the model
# (``code_paths``: MLflow puts it on sys.path when the model loads), so the model loads in an
# environment without kdray installed.
MODEL_REQUIREMENTS = ("mlflow", "torch", "timm", "numpy", "opencv-python-headless", "PyYAML",
                      "safetensors")


def requirements() -> list[str]:
    """Pinned to this environment's versions, without MLflow's 5-7 s pip inference."""
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for p in MODEL_REQUIREMENTS:
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{p}=={version(p)}")
    return out


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


# ----------------------------------------------------------------------------- out

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
    from kdray.inference import model_from_checkpoint
    with tempfile.TemporaryDirectory(prefix="kdray-model-") as tmp:
        return model_from_checkpoint(download_weights(ref, tmp, uri))


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
    info = {"name": mv.name, "version": mv.version, "aliases": [], "run_id": mv.run_id,
            "source": mv.source,
            "status": mv.status, "tags": dict(mv.tags or {}), "created": mv.creation_timestamp}
    if mv.run_id:
        with contextlib.suppress(MlflowException):
            info["metrics"] = client.get_run(mv.run_id).data.metrics
    rm = client.get_registered_model(mv.name)
    info["aliases"] = sorted(a for a, v in (rm.aliases or {}).items() if str(v) == str(mv.version))
    return info
