"""``kdray test``: a trained model on a config's val split -> results file + metrics (MMPose's
tools/test.py for kdray).

The val persons come from the config's data section (ground-truth boxes, or the detector boxes
of ``data.val_boxes``), cropped at the model's own input size (its checkpoint ``meta``), run
with the flip test of the stage's train config, mapped back to image pixels and scored by the
same code that scores validation during training (kdray/eval/runner.py). ``results.json`` is
exactly what ``kdray eval --pred`` reads, so both commands give the same numbers.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdray.config import ExperimentConfig
from kdray.data.coco import load_dataset
from kdray.data.dataset import PoseDataset, make_loader
from kdray.data.keypoints import spec_for
from kdray.errors import InputError
from kdray.eval.runner import ValSet, predict_dataset, results_of, score
from kdray.inference import Predictor, model_from_checkpoint
from kdray.stage_run import METRIC, ensure_data, kind


def load_model(ref: str) -> tuple[nn.Module, dict]:
    """(network in eval mode, meta) from a checkpoint file/folder or ``models:/NAME@ALIAS``."""
    if ref.startswith("models:/"):
        from kdray.orchestration.registry import load_registered
        from kdray.orchestration.tracking import existing_store
        return load_registered(ref, existing_store())
    return model_from_checkpoint(ref)


class DeployedTask(nn.Module):
    """A deployable network behind the task's ``predict(batch, flip_test)`` (kdray/tasks.py), so
    the training-time val loop (:func:`kdray.eval.runner.predict_dataset`) runs it unchanged."""

    def __init__(self, module: nn.Module, meta: dict, device: str):
        super().__init__()
        self.predictor = Predictor(module, meta, device)
        self.module = self.predictor.module   # parameters() tells the loop the device

    def predict(self, batch: dict, flip_test: bool = True) -> dict:
        coords, scores = self.predictor.crops(batch["image"], flip_test)
        return {"coords": coords, "scores": scores}


def val_data(cfg: ExperimentConfig, meta: dict):
    """The data section at the model's input size and codec, checked against its joints."""
    spec, own = spec_for(cfg.data.dataset), spec_for(meta["dataset"])
    if spec.num_joints != own.num_joints:
        raise InputError(f"data.dataset: {cfg.data.dataset!r} has {spec.num_joints} keypoints, "
                         f"the model was trained on {meta['dataset']!r} ({own.num_joints}); "
                         f"give the config of its dataset (--config) or data.dataset=...")
    return dataclasses.replace(cfg.data, input_size=tuple(meta["input_size"]),
                               split_ratio=meta["split_ratio"], sigma=meta["sigma"],
                               padding=meta.get("padding", cfg.data.padding))


def run_test(ref: str, cfg: ExperimentConfig, out: str | Path) -> dict:
    """Write ``out/results.json`` and ``out/metrics.json``; return the metrics (percent)."""
    module, meta = load_model(ref)
    data = val_data(cfg, meta)
    ensure_data(cfg)
    records, spec = load_dataset(data, "val")
    stage = kind(meta.get("stage", "teacher"))
    train = stage.train(cfg)
    loader = make_loader(PoseDataset(records, spec, data, train=False), train.batch_size * 2,
                         False, data.num_workers, train.seed)
    val = ValSet(records, Path(data.root) / data.val_ann, METRIC[data.dataset],
                 tuple(data.input_size), crowd_buckets=data.dataset == "synthpose")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preds = predict_dataset(DeployedTask(module, meta, device), loader, val.input_size,
                            train.flip_test)
    results = results_of(val, preds)
    if isinstance(results, np.ndarray):   # PCKh: one joints list per GT person, in GT order
        results = [{"image": Path(r.image_path).name, "joints": j.tolist()}
                   for r, j in zip(records, results)]
    metrics = score(val, preds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
