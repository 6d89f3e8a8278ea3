"""Stages without Ray: build the data, the networks and the task of one stage, then fit.

A stage is one of ``teacher`` (plain SimCC), ``student`` (TSD stage 1; with every KD term off it
is the undistilled baseline), ``gcn`` (TSD stage 2) and ``cdkd``. Upstream networks arrive as
checkpoint paths in ``inputs`` (``teacher``, ``student``). The Ray layer calls the same
:func:`build_stage` on each worker and hands :func:`kdray.train.fit` its report callback.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from kdray.codecs.simcc import SimCCCodec, sigma_for_size
from kdray.config import (ConfigError, ExperimentConfig, StageConfig, TrainConfig, file_hash,
                          flatten, to_dict)
from kdray.data.coco import load_dataset
from kdray.data.dataset import PoseDataset, make_loader
from kdray.data.frozen_cache import cached_loaders, ensure_cache
from kdray.data.keypoints import KeypointSpec
from kdray.data.shards import train_dataset
from kdray.eval.runner import ValSet, make_evaluator
from kdray.inference import model_from_checkpoint, pose_model_meta
from kdray.losses import tsd
from kdray.nn.igp_gcn import IGPGCN
from kdray.nn.pose_model import build_pose_model
from kdray.nn.refined import gcn_feature_channels
from kdray.tasks import CDKDTask, SimCCTask, TSDStage1Task, TSDStage2Task
from kdray.train import CheckpointError, FitResult, fast_paths, fit, seed_everything

STAGES = ("teacher", "student", "gcn", "cdkd")
METRIC = {"coco": "coco", "synthpose": "coco", "crowdpose": "crowdpose", "mpii": "pckh"}


@dataclass
class BuiltStage:
    task: torch.nn.Module
    train_cfg: TrainConfig
    train_loader: object
    evaluate: object
    val: ValSet


def stage_inputs(stage: str, cfg: ExperimentConfig) -> tuple[str, ...]:
    """Which upstream checkpoints a stage needs (the DAG's edges)."""
    if stage == "student":
        s1 = cfg.tsd.stage1
        return ("teacher",) if (s1.feature or s1.pose or s1.structure) else ()
    if stage == "gcn":
        return ("student", "teacher") if cfg.tsd.stage2.mode == "teacher" else ("student",)
    if stage == "cdkd":
        return ("teacher",)
    return ()


def stage_sections(stage: str, cfg: ExperimentConfig) -> dict[str, object]:
    """The config sections a stage's output depends on besides data and its inputs, by dotted
    prefix (the pipeline's cache key hashes them; ``kdray train`` compares them to resume)."""
    if stage == "teacher":
        return {"teacher": cfg.teacher}
    if stage == "student":
        kd = {"tsd.stage1": cfg.tsd.stage1} if stage_inputs(stage, cfg) else {}
        return {"student": cfg.student, **kd}
    if stage == "gcn":
        return {"tsd.stage2": cfg.tsd.stage2, "student.model": cfg.student.model}
    if stage == "cdkd":
        return {"cdkd": cfg.cdkd}
    raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")


def result_fields(stage: str, cfg: ExperimentConfig) -> dict:
    """Every dotted field that changes what the stage produces, with its value: its sections
    and the data config, less the loader workers (``data.num_workers``)."""
    fields = {}
    for prefix, section in {**stage_sections(stage, cfg), "data": cfg.data}.items():
        fields.update(flatten(section, prefix + "."))
    fields.pop("data.num_workers")
    return json.loads(json.dumps(fields))   # tuples as lists, as they read back from JSON


def stage_config(stage: str, cfg: ExperimentConfig) -> StageConfig | TrainConfig:
    return {"teacher": cfg.teacher, "student": cfg.student, "gcn": cfg.tsd.stage2.train,
            "cdkd": cfg.cdkd.student}[stage]


def _sizes(stage: str, cfg: ExperimentConfig):
    low = cfg.cdkd.low_res_size if stage == "cdkd" else None
    return cfg.data.input_size, low


def ensure_data(cfg: ExperimentConfig) -> None:
    """SynthPose is generated on first use (deterministic by seed); real data must exist."""
    d = cfg.data
    root = Path(d.root)
    if d.dataset != "synthpose":
        return
    from kdray.data.synthpose import Difficulty, check_generated, generate
    s, hard = d.synth, Difficulty.of(d.synth)
    if (root / d.train_ann).exists():
        check_generated(root, s.train, s.val, s.seed, hard)
    else:
        generate(root, train=s.train, val=s.val, seed=s.seed, hard=hard)


def load_records(cfg: ExperimentConfig):
    ensure_data(cfg)
    train, spec = load_dataset(cfg.data, "train")
    val, _ = load_dataset(cfg.data, "val")
    if cfg.data.max_train:
        train = train[:cfg.data.max_train]
    return train, val, spec


def _codec(cfg: ExperimentConfig, size) -> SimCCCodec:
    """The codec of a view; the same sigma scaling as the dataset's targets."""
    sigma = sigma_for_size(cfg.data.sigma, tuple(size), tuple(cfg.data.input_size))
    return SimCCCodec(tuple(size), cfg.data.split_ratio, sigma)


def _task(stage: str, cfg: ExperimentConfig, spec: KeypointSpec, train_records,
          inputs: dict[str, str]):
    size, low = _sizes(stage, cfg)
    k, flip = cfg.data.split_ratio, spec.flip_index()
    teacher = (model_from_checkpoint(inputs["teacher"])[0] if "teacher" in inputs else None)
    if stage == "teacher":
        model = build_pose_model(cfg.teacher.model, spec.num_joints, size, k)
        return SimCCTask(model, _codec(cfg, size), flip), cfg.teacher
    if stage == "student":
        model = build_pose_model(cfg.student.model, spec.num_joints, size, k)
        s1 = cfg.tsd.stage1
        edges = torch.tensor(spec.skeleton, dtype=torch.long)
        lengths = None
        if s1.edge_weights == "inverse_length":
            lengths = tsd.mean_edge_lengths(_normalised_keypoints(train_records), spec.skeleton)
        weights = tsd.edge_weights(spec.skeleton, s1.edge_weights, lengths)
        task = TSDStage1Task(model, teacher, _codec(cfg, size), flip, s1, edges, weights)
        return task, cfg.student
    if stage == "gcn":
        student = model_from_checkpoint(inputs["student"])[0]
        s2 = cfg.tsd.stage2
        gcn = IGPGCN(spec.num_joints, spec.skeleton, gcn_feature_channels(student),
                     hidden=s2.hidden)
        task = TSDStage2Task(student, gcn, teacher if s2.mode == "teacher" else None,
                             _codec(cfg, size), flip, s2)
        return task, StageConfig(model=cfg.student.model, train=s2.train)
    if stage == "cdkd":
        c = cfg.cdkd
        model = build_pose_model(c.student.model, spec.num_joints, low, k,
                                 size_field="cdkd.low_res_size")
        with torch.no_grad():
            probe = teacher(torch.zeros(1, 3, *size))["feats"][-1]
        task = CDKDTask(model, teacher, _codec(cfg, low), flip, c, tuple(probe.shape[-2:]))
        return task, c.student
    raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")


def _normalised_keypoints(records):
    """(N, K, 3) keypoints in box-normalised units, for inverse-length edge weights."""
    import numpy as np
    kp = np.stack([r.keypoints for r in records]).copy()
    wh = np.stack([r.bbox[2:] for r in records])[:, None, :]
    kp[..., :2] = (kp[..., :2] - np.stack([r.bbox[:2] for r in records])[:, None]) / wh
    return torch.from_numpy(kp)


def build_stage(stage: str, cfg: ExperimentConfig, inputs: dict[str, str] | None = None,
                records=None, frozen: str | Path | None = None) -> BuiltStage:
    """The stage's task, loaders and evaluator. ``frozen``: a gcn stage reads the frozen
    networks' outputs from this cache (:func:`build_frozen_cache`) instead of running them."""
    inputs = inputs or {}
    missing = [r for r in stage_inputs(stage, cfg) if r not in inputs]
    if missing:
        raise ValueError(f"stage {stage!r} needs checkpoints for {missing}")
    train_recs, val_recs, spec = records or load_records(cfg)
    seed_everything(stage_config(stage, cfg).train.seed if stage != "gcn"
                    else cfg.tsd.stage2.train.seed)  # initial weights: a function of the seed
    task, scfg = _task(stage, cfg, spec, train_recs, inputs)
    size, low = _sizes(stage, cfg)
    task.meta = pose_model_meta(stage, cfg, scfg.model, spec, low or size)
    train_ds = train_dataset(train_recs, spec, cfg.data, low_res_size=low)  # data.shards
    val_ds = PoseDataset(val_recs, spec, cfg.data, train=False, low_res_size=low)
    t = scfg.train
    if frozen is not None and stage == "gcn":
        train_loader, val_loader = cached_loaders(frozen, t.batch_size, t.seed)
    else:
        train_loader = make_loader(train_ds, t.batch_size, True, cfg.data.num_workers, t.seed)
        val_loader = make_loader(val_ds, t.batch_size * 2, False, cfg.data.num_workers, t.seed)
    data = cfg.data
    val = ValSet(val_recs, Path(data.root) / data.val_ann, METRIC[data.dataset], low or size,
                 crowd_buckets=data.dataset == "synthpose")
    return BuiltStage(task, t, train_loader, make_evaluator(val_loader, val, t.flip_test), val)


def build_frozen_cache(cfg: ExperimentConfig, inputs: dict[str, str], cache_dir: str | Path,
                       records=None) -> Path:
    """Run the frozen stage-1 student (and teacher) once over every stage-2 training epoch and
    the val set; Parquet shards in ``cache_dir`` (kdray/data/frozen_cache.py)."""
    train_recs, val_recs, spec = records or load_records(cfg)
    built = build_stage("gcn", cfg, inputs, (train_recs, val_recs, spec))
    t = built.train_cfg
    val_ds = PoseDataset(val_recs, spec, cfg.data, train=False)
    cl = fast_paths(t, built.task.backbone, torch.device("cpu")).channels_last
    return ensure_cache(cache_dir, built.task, built.train_loader.dataset, val_ds, t.seed,
                        t.epochs, t.flip_test, num_workers=cfg.data.num_workers,
                        channels_last=cl)


RUN_FILE = "train.json"     # what `kdray train` ran in an output dir: stage, fields, inputs
OUTPUTS = ("checkpoints", "metrics.json", "loss_curve.png", "config.yaml", RUN_FILE)


def claim_out_dir(stage: str, cfg: ExperimentConfig, out: Path, inputs: dict[str, str],
                  overwrite: bool = False) -> None:
    """``kdray train --out DIR`` continues a run in DIR only if it was made by the same stage,
    config fields that change results (:func:`result_fields`) and input checkpoints; anything
    else stops with the differing keys named, unless ``overwrite`` clears DIR's outputs first."""
    record = {"stage": stage, "fields": result_fields(stage, cfg),
              "inputs": {k: _input_digest(v) for k, v in sorted(inputs.items())}}
    started = (out / "checkpoints" / "last.pt").exists()
    if started and overwrite:
        for name in OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif started:
        try:
            old = json.loads((out / RUN_FILE).read_text())
        except (OSError, ValueError):
            raise ConfigError(f"{out}: holds a run whose {RUN_FILE} is missing or unreadable, "
                              f"so it cannot be resumed safely; pass --overwrite to start afresh "
                              f"or give another --out") from None
        diff = _differences(old, record)
        if diff:
            shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
            raise ConfigError(f"{out}: holds a run of another config ({shown}); pass --overwrite "
                              f"to start afresh, or give another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(record, indent=1))


def _input_digest(path: str) -> str:
    file = Path(path) / "last.pt" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: checkpoint file not found")
    return file_hash(file)


def _differences(old: dict, new: dict) -> list[str]:
    """``'key: old -> new'`` for each field, the stage and each input that differ."""
    diff = [f"stage: {old.get('stage')} -> {new['stage']}"] if old.get("stage") != new["stage"] \
        else []
    for group in ("fields", "inputs"):
        a, b = old.get(group, {}), new[group]
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<absent>") != b.get(key, "<absent>"):
                name = key if group == "fields" else f"--{key} checkpoint"
                diff.append(f"{name}: {a.get(key, '<absent>')} -> {b.get(key, '<absent>')}")
    return diff


def run_stage(stage: str, cfg: ExperimentConfig, out_dir: str | Path,
              inputs: dict[str, str] | None = None, report=None, resume_from=None,
              records=None, frozen: str | Path | None = None, progress=None) -> FitResult:
    """Build and fit one stage in this process; checkpoints and metrics land in ``out_dir``."""
    built = build_stage(stage, cfg, inputs, records, frozen)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(__import__("yaml").safe_dump(to_dict(cfg), sort_keys=False))
    return fit(built.task, built.train_loader, built.train_cfg, out, built.evaluate,
               report=report, resume_from=resume_from, on_progress=progress)
