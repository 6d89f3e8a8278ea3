"""Stages without Ray: build one stage's data, networks and task, then fit.

A stage kind (kdray/stages.py) says what to build; this module builds it: the records, the
upstream networks from their checkpoints (``inputs``: ``teacher``, ``student``), the datasets
and loaders, the evaluator, and the task. The Ray layer calls the same :func:`build_stage` on
each worker and hands :func:`kdray.train.fit` its report callback.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, is_dataclass
from pathlib import Path

import torch

from kdray.config import ConfigError, ExperimentConfig, TrainConfig, file_hash, flatten, to_dict
from kdray.console import log
from kdray.data.coco import load_dataset
from kdray.data.dataset import PoseDataset, make_loader
from kdray.data.frozen_cache import cached_loaders, ensure_cache
from kdray.data.shards import train_dataset
from kdray.eval.runner import ValSet, make_evaluator
from kdray.inference import model_from_checkpoint, pose_model_meta
from kdray.stages import STAGES, TSD_REFINED, Stage
from kdray.train import CheckpointError, FitResult, fast_paths, fit, seed_everything

METRIC = {"coco": "coco", "synthpose": "coco", "crowdpose": "crowdpose", "mpii": "pckh"}


def kind(stage: Stage | str) -> Stage:
    """A stage kind, or its name resolved once (command line, search spaces, tests)."""
    if isinstance(stage, Stage):
        return stage
    if stage not in STAGES:
        raise ConfigError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    return STAGES[stage]


@dataclass
class BuiltStage:
    task: torch.nn.Module
    train_cfg: TrainConfig
    train_loader: object
    evaluate: object
    val: ValSet
    val_loader: object = None


def result_fields(stage: Stage, cfg: ExperimentConfig) -> dict:
    """Every dotted field that changes what the stage produces, with its value: its sections
    and the data config, less the loader workers (``data.num_workers``)."""
    fields = {}
    for prefix, section in {**stage.sections(cfg), "data": cfg.data}.items():
        fields.update(flatten(section, prefix + ".") if is_dataclass(section)
                      else {prefix: section})
    fields.pop("data.num_workers")
    return json.loads(json.dumps(fields))   # tuples as lists, as they read back from JSON


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


def build_stage(stage: Stage | str, cfg: ExperimentConfig, inputs: dict[str, str] | None = None,
                records=None, frozen: str | Path | None = None) -> BuiltStage:
    """The stage's task, loaders and evaluator. ``frozen``: a TSD refinement reads the frozen
    networks' outputs from this cache (:func:`build_frozen_cache`) instead of running them."""
    stage, inputs = kind(stage), inputs or {}
    stage.check(cfg)
    missing = [r for r in stage.inputs(cfg) if r not in inputs]
    if missing:
        raise ValueError(f"stage {stage.name!r} needs checkpoints for {missing}")
    train_recs, val_recs, spec = records or load_records(cfg)
    seed_everything(stage.seed(cfg))  # initial weights: a function of the seed
    # Loaded after seeding and teacher first: rebuilding a network draws from the RNG, so the
    # new networks' initial weights depend on this order.
    nets = {name: model_from_checkpoint(inputs[name])[0] for name in ("teacher", "student")
            if name in stage.inputs(cfg)}
    task = stage.build_task(cfg, spec, train_recs, nets)
    size, low = stage.input_size(cfg), stage.low_res(cfg)
    task.meta = pose_model_meta(stage, cfg, spec)
    task.freeze_bn = stage.model(cfg).freeze_bn
    t = stage.train(cfg)
    if 0 < t.labelled < len(train_recs):
        log(f"{stage.name}: GT labels for the first {t.labelled} of {len(train_recs)} training "
            f"persons; the other {len(train_recs) - t.labelled} are a transfer set (the "
            f"teacher's supervision only)")
    train_ds = train_dataset(train_recs, spec, cfg.data, low_res_size=low,  # data.shards
                             labelled=t.labelled)
    val_ds = PoseDataset(val_recs, spec, cfg.data, train=False, low_res_size=low)
    if frozen is not None:
        train_loader, val_loader = cached_loaders(frozen, t.batch_size, t.seed)
    else:
        train_loader = make_loader(train_ds, t.batch_size, True, cfg.data.num_workers, t.seed)
        val_loader = make_loader(val_ds, t.batch_size * 2, False, cfg.data.num_workers, t.seed)
    data = cfg.data
    val = ValSet(val_recs, Path(data.root) / data.val_ann, METRIC[data.dataset], size,
                 crowd_buckets=data.dataset == "synthpose")
    return BuiltStage(task, t, train_loader, make_evaluator(val_loader, val, t.flip_test), val,
                      val_loader)


def build_frozen_cache(cfg: ExperimentConfig, inputs: dict[str, str], cache_dir: str | Path,
                       records=None) -> Path:
    """Run the frozen stage-1 student (and teacher) once over every stage-2 training epoch and
    the val set; Parquet shards in ``cache_dir`` (kdray/data/frozen_cache.py)."""
    train_recs, val_recs, spec = records or load_records(cfg)
    built = build_stage(TSD_REFINED, cfg, inputs, (train_recs, val_recs, spec))
    t = built.train_cfg
    val_ds = PoseDataset(val_recs, spec, cfg.data, train=False)
    cl = fast_paths(t, torch.device("cpu")).channels_last
    return ensure_cache(cache_dir, built.task, built.train_loader.dataset, val_ds, t.seed,
                        t.epochs, t.flip_test, num_workers=cfg.data.num_workers,
                        channels_last=cl)


RUN_FILE = "train.json"     # what `kdray train` ran in an output dir: stage, fields, inputs
OUTPUTS = ("checkpoints", "metrics.json", "loss_curve.png", "config.yaml", RUN_FILE)


def claim_out_dir(stage: Stage | str, cfg: ExperimentConfig, out: Path,
                  inputs: dict[str, str], overwrite: bool = False) -> None:
    """``kdray train --out DIR`` continues a run in DIR only if it was made by the same stage,
    config fields that change results (:func:`result_fields`) and input checkpoints; anything
    else stops with the differing keys named, unless ``overwrite`` clears DIR's outputs first."""
    stage = kind(stage)
    record = {"stage": stage.name, "fields": result_fields(stage, cfg),
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


def run_stage(stage: Stage | str, cfg: ExperimentConfig, out_dir: str | Path,
              inputs: dict[str, str] | None = None, report=None, resume_from=None,
              records=None, frozen: str | Path | None = None, progress=None) -> FitResult:
    """Build and fit one stage in this process; checkpoints and metrics land in ``out_dir``."""
    built = build_stage(stage, cfg, inputs, records, frozen)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(__import__("yaml").safe_dump(to_dict(cfg), sort_keys=False))
    return fit(built.task, built.train_loader, built.train_cfg, out, built.evaluate,
               report=report, resume_from=resume_from, on_progress=progress)
