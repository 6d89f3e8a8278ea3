"""Pipelines as plain driver code: stages keyed by config hash, reused when done, resumed when not.

A pipeline (pipelines/two_stage.py, pipelines/cdkd.py) is a :class:`Pipeline` context and a few
calls to :meth:`Pipeline.stage`; the DAG is the order of the calls and the results they pass on
(Ray Workflows is gone, PITFALLS.md). A stage's key hashes only what changes its output:

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
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kdray.config import (ExperimentConfig, config_hash, dump_yaml, flatten, load_config,
                          with_overrides)
from kdray.orchestration import ray_train, tracking
from kdray.stages import METRIC, ensure_data, stage_inputs


@dataclass(frozen=True)
class StageResult:
    """A finished stage (DESIGN.md section 3): what downstream stages and the registry need."""
    stage: str
    key: str                 # config hash: the cache key
    checkpoint: str          # absolute path of the checkpoint (last.pt)
    run_id: str              # the MLflow run that trained it ("" for a given checkpoint)
    metrics: dict = field(default_factory=dict)   # final epoch: losses, val_* metrics
    out_dir: str = ""
    wall_seconds: float = 0.0
    reused: bool = False


def log(msg: str) -> None:
    print(f"[kdray] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- keys

def stage_sections(stage: str, cfg: ExperimentConfig) -> tuple:
    """The config sections a stage's output depends on (besides data and its inputs)."""
    if stage == "teacher":
        return (cfg.teacher,)
    if stage == "student":
        return (cfg.student, cfg.tsd.stage1) if stage_inputs(stage, cfg) else (cfg.student,)
    if stage == "gcn":
        return (cfg.tsd.stage2, cfg.student.model)
    if stage == "cdkd":
        return (cfg.cdkd,)
    raise ValueError(f"unknown stage {stage!r}")


def stage_key(stage: str, cfg: ExperimentConfig, input_keys: dict[str, str]) -> str:
    """Hash of the stage's sections, the data config and its inputs' keys (not the whole config:
    loader workers, tracking and Ray settings do not change what a stage produces)."""
    data = dataclasses.replace(cfg.data, num_workers=0)
    return config_hash(stage, *stage_sections(stage, cfg), data, dict(sorted(input_keys.items())))


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
    """One pipeline run: MLflow parent run, stage cache, Ray, summary.

    ``with Pipeline("two_stage", cfg, args) as p:`` ... ``p.stage(...)`` ... ``p.finish(...)``.
    """

    def __init__(self, name: str, cfg: ExperimentConfig, args: argparse.Namespace):
        self.name = name
        self.storage = Path(args.storage or os.environ.get("KDRAY_STORAGE") or Path.cwd()).resolve()
        self.cfg = resolve_config(cfg, self.storage)
        # Relative --out/--cache are under the storage dir too (a job's CWD is a temp copy).
        self.out = (self.storage / (args.out or Path("runs") / name)).resolve()
        self.cache = (self.storage / (args.cache or Path("runs") / "stages")).resolve()
        # Ray Train's run storage: a shared folder or a URI (s3://...) on multi-node clusters.
        ray_storage = self.cfg.ray.storage_path or str(self.cache / "ray")
        self.ray_storage = ray_storage if "://" in ray_storage else \
            str((self.storage / ray_storage).resolve())
        self.uri = tracking.resolve_uri(self.cfg.tracking.uri, self.storage)
        self.results: dict[str, StageResult] = {}
        self.registered: dict[str, dict] = {}
        self._child_runs: dict[tuple[str, str], str] = {}   # (stage, key) -> this run's child
        self.run_id = ""   # set before entering to continue that parent run (a resumed sweep)

    # -- context: the parent run -------------------------------------------------------------
    def __enter__(self) -> "Pipeline":
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.experiment_id = tracking.init_store(self.uri, self.cfg.tracking.experiment)
        if self.run_id:
            tracking.reopen_run(self.uri, self.run_id)
        else:
            self.run_id = tracking.start_run(self.uri, self.experiment_id, self.name,
                                             tags={"kdray.pipeline": self.name})
            tracking.log_params(self.uri, self.run_id, flatten(self.cfg))
        dump_yaml(self.cfg, self.out / "config.yaml")
        tracking.log_artifacts(self.uri, self.run_id, [self.out / "config.yaml"])
        log(f"{self.name}: out {self.out}, stage cache {self.cache}, MLflow {self.uri} "
            f"(run {self.run_id})")
        ensure_data(self.cfg)  # on the driver, before workers read it
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        tracking.end_run(self.uri, self.run_id, "FINISHED" if exc is None else "FAILED")
        ray_train.shutdown_ray()  # Ray starts on the first stage that trains

    # -- stages ------------------------------------------------------------------------------
    def stage(self, stage: str, cfg: ExperimentConfig | None = None, label: str | None = None,
              **inputs: StageResult) -> StageResult:
        """Run ``stage`` (or reuse it); ``inputs`` are upstream results (teacher=, student=)."""
        cfg = resolve_config(cfg, self.storage) if cfg is not None else self.cfg
        label = label or stage
        needed = stage_inputs(stage, cfg)
        missing = [n for n in needed if n not in inputs]
        if missing:
            raise ValueError(f"stage {label!r} needs {missing}")
        used = {n: inputs[n] for n in needed}  # e.g. the baseline ignores a given teacher
        key = stage_key(stage, cfg, {n: r.key for n, r in used.items()})
        stage_dir = self.cache / f"{stage}-{key}"
        with _lock(self.cache / f"{stage}-{key}.lock"):
            done = _read_marker(stage_dir)
            if done is not None:
                result = self._reuse(label, done)
            else:
                result = self._train(stage, label, cfg, key, stage_dir, used)
        self.results[label] = result
        return result

    def _train(self, stage, label, cfg, key, stage_dir, used) -> StageResult:
        resumed = (stage_dir / "attempts.jsonl").exists()
        log(f"{label}: {'resuming' if resumed else 'training'} stage {stage} "
            f"(key {key}) in {stage_dir}")
        run_id = tracking.start_run(self.uri, self.experiment_id, label, parent_id=self.run_id,
                                    tags={"kdray.stage": stage, "kdray.stage_key": key,
                                          "kdray.label": label})
        tracking.log_params(self.uri, run_id, flatten(cfg))
        t0 = time.perf_counter()
        try:
            fit = ray_train.train_stage(stage, cfg, stage_dir,
                                        {n: r.checkpoint for n, r in used.items()},
                                        run_name=f"{stage}-{key}", storage_path=self.ray_storage,
                                        mlflow=(self.uri, run_id))
            wall = time.perf_counter() - t0
            tracking.log_history(self.uri, run_id, fit.history)
            pose_sheet(fit.checkpoint, cfg, stage_dir / "poses.png")
            tracking.log_artifacts(self.uri, run_id, [
                stage_dir / n for n in ("config.yaml", "metrics.json", "loss_curve.png",
                                        "poses.png")])
            tracking.log_metrics(self.uri, run_id, {"wall_seconds": wall})
        except BaseException:
            tracking.end_run(self.uri, run_id, "FAILED")
            raise
        tracking.end_run(self.uri, run_id)
        self._child_runs[(stage, key)] = run_id
        result = StageResult(stage, key, str(fit.checkpoint), run_id, fit.metrics,
                             str(stage_dir), wall)
        _write_marker(stage_dir, result)
        log(f"{label}: done in {wall:.0f} s, {_brief(result.metrics)}")
        return result

    def _reuse(self, label: str, done: StageResult) -> StageResult:
        log(f"{label}: reused finished stage {done.stage} (key {done.key}, trained in MLflow "
            f"run {done.run_id or '-'}) from {done.out_dir}")
        run_id = tracking.start_run(self.uri, self.experiment_id, label, parent_id=self.run_id,
                                    tags={"kdray.stage": done.stage, "kdray.stage_key": done.key,
                                          "kdray.label": label, "kdray.reused": "true",
                                          "kdray.trained_run_id": done.run_id})
        tracking.log_metrics(self.uri, run_id, done.metrics, step=int(done.metrics.get("epoch", 0)))
        tracking.end_run(self.uri, run_id)
        self._child_runs[(done.stage, done.key)] = run_id
        return dataclasses.replace(done, reused=True)

    def teacher(self, given: str | None = None) -> StageResult:
        """The teacher: trained (once per teacher config), or a checkpoint path or
        ``models:/NAME@ALIAS`` given on the command line."""
        if not given:
            return self.stage("teacher")
        metrics: dict = {}
        if given.startswith("models:/"):
            path = tracking.download_weights(given, self.out / "given_teacher", self.uri)
            tags = tracking.show_model(given, self.uri)["tags"]
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
        run_id = tracking.start_run(self.uri, self.experiment_id, "teacher", parent_id=self.run_id,
                                    tags={"kdray.stage": "teacher", "kdray.label": "teacher",
                                          "kdray.given": given})
        tracking.log_metrics(self.uri, run_id, metrics)
        tracking.end_run(self.uri, run_id)
        result = StageResult("teacher", tracking.file_hash(path), str(path), "", metrics,
                             str(path.parent), 0.0, True)
        self.results["teacher"] = result
        return result

    # -- registry ----------------------------------------------------------------------------
    def register(self, result: StageResult) -> dict | None:
        """Log ``result`` as a pyfunc model (in this pipeline's child run of the stage) and
        register it: alias ``candidate``; ``champion`` if it beats the champion's val metric."""
        if not self.cfg.tracking.register or not result.run_id:  # a given teacher: not ours
            return None
        metric = primary_metric(self.cfg)
        value = result.metrics.get(metric)
        if not isinstance(value, (int, float)):
            log(f"{result.stage}: no {metric} to rank it by; not registered")
            return None
        name = tracking.MODEL_NAMES[result.stage]
        model_uri = None
        if tracking.find_version(self.uri, name, result.key) is None:
            with tempfile.TemporaryDirectory(prefix="kdray-export-") as tmp:
                info = tracking.log_pose_model(self.uri, self._child_runs[(result.stage,
                                                                           result.key)],
                                               result.checkpoint, tmp)
            model_uri = info.model_uri
        val_set = tracking.file_hash(Path(self.cfg.data.root) / self.cfg.data.val_ann)
        reg = tracking.register(self.uri, result.stage, model_uri, run_id=result.run_id,
                                stage_key=result.key, val_set=val_set, metric=metric,
                                value=float(value))
        self.registered[name] = reg
        log(f"registered {name} version {reg['version']} ({metric} {value:.2f})"
            f"{', champion' if reg['champion'] else ''}")
        return reg

    # -- the end -----------------------------------------------------------------------------
    def finish(self, metrics: dict, outputs: dict | None = None) -> dict:
        """Print the one summary JSON line and write ``summary.json`` (DESIGN.md section 1)."""
        outputs = {"out_dir": str(self.out), "cache": str(self.cache), "mlflow_uri": self.uri,
                   "stages": {k: r.checkpoint for k, r in self.results.items()},
                   "models": {k: f"models:/{k}/{v['version']}"
                              for k, v in self.registered.items()}, **(outputs or {})}
        summary = {"pipeline": self.name, "mlflow_run_id": self.run_id, "metrics": metrics,
                   "outputs": outputs}
        tracking.log_metrics(self.uri, self.run_id, metrics)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        tracking.log_artifacts(self.uri, self.run_id, [self.out / "summary.json"])
        print(json.dumps(summary), flush=True)
        return summary


def _brief(metrics: dict) -> str:
    keys = ("val_AP", "val_Mean", "val_err_occluded", "loss")
    return ", ".join(f"{k} {metrics[k]:.3g}" for k in keys if isinstance(metrics.get(k), float))


# ----------------------------------------------------------------------------- markers

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


# ----------------------------------------------------------------------------- artifacts

def pose_sheet(checkpoint, cfg: ExperimentConfig, out_png: Path, n: int = 12,
               crop_hw: tuple[int, int] = (128, 96)) -> Path:
    """PNG sheet of predicted poses on the first ``n`` val persons (whole-image inference)."""
    import cv2
    import numpy as np

    from kdray.data.coco import load_dataset, read_image
    from kdray.data.keypoints import spec_for
    from kdray.inference import Predictor, model_from_checkpoint
    from kdray.vis import crop_person, draw_pose, make_sheet

    module, meta = model_from_checkpoint(checkpoint)
    predict = Predictor(module, meta)
    records, _ = load_dataset(cfg.data, "val")
    spec = spec_for(meta["dataset"])
    tiles = []
    for rec in records[:n]:
        image = read_image(rec.image_path)
        kp = predict(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), rec.bbox[None])[0]
        crop, m = crop_person(image, rec.bbox, crop_hw)
        xy = kp[:, :2] @ m[:, :2].T + m[:, 2]
        # Every joint is drawn: SimCC confidences (max of a smoothed softmax) stay far below
        # draw_pose's default 0.3 threshold even when the joint is right.
        tiles.append(draw_pose(crop, xy, spec, scores=kp[:, 2], score_thr=0.0))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_png), make_sheet(tiles, ncols=6))
    return out_png


# ----------------------------------------------------------------------------- command line

def parse_args(pipeline: str, argv: list[str] | None = None, doc: str = "",
               extra=None) -> tuple[argparse.Namespace, ExperimentConfig]:
    """The pipeline contract (DESIGN.md section 1): --config, dotted overrides, --out, ..."""
    p = argparse.ArgumentParser(prog=f"pipelines/{pipeline}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: embedded defaults)")
    p.add_argument("--storage", default=None,
                   help="root of every output: runs/, the stage cache, mlflow.db, relative data "
                        "paths (default: $KDRAY_STORAGE or the CWD; give it under `ray job`)")
    p.add_argument("--out", default=None,
                   help=f"output dir (default <storage>/runs/{pipeline}; relative: under storage)")
    p.add_argument("--cache", default=None,
                   help="stage cache shared by pipelines (default <storage>/runs/stages)")
    p.add_argument("--teacher", default=None,
                   help="use this teacher instead of training one: a checkpoint or "
                        "models:/NAME@ALIAS")
    if extra is not None:
        extra(p)
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = p.parse_intermixed_args(argv)  # positionals (a sweep's space file) before options
    return args, load_config(args.config, args.overrides)
