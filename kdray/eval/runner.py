"""Run a task over a validation loader and score it (COCO/CrowdPose AP or MPII PCKh).

Predictions come back to image coordinates through the crop's inverse affine; the metric is
the reference evaluator's (pycocotools), never a re-implementation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdray.data.coco import PersonRecord
from kdray.data.transforms import back_to_image
from kdray.eval.coco import evaluate_coco, to_coco_results
from kdray.eval.pckh import evaluate_pckh


@dataclass(frozen=True)
class ValSet:
    """What evaluation needs besides the loader: the records and how to score them."""
    records: list[PersonRecord]
    gt_file: Path
    metric: str            # coco | crowdpose | pckh (synthpose: coco + crowd buckets)
    input_size: tuple[int, int]
    crowd_buckets: bool = False


@torch.no_grad()
def predict_dataset(task, loader, input_size, flip_test: bool = True,
                    device: torch.device | None = None) -> dict:
    """Image-space coordinates (N, K, 2), scores (N, K) and dataset indices (N,)."""
    device = device or next(task.parameters()).device
    coords, scores, index, center, scale = [], [], [], [], []
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        out = task.predict(batch, flip_test=flip_test)
        coords.append(out["coords"].float().cpu())
        scores.append(out["scores"].float().cpu())
        index.append(batch["index"].cpu())
        center.append(batch["center"].cpu())
        scale.append(batch["scale"].cpu())
    crop = torch.cat(coords)
    img = back_to_image(crop.numpy(), torch.cat(center).numpy(), torch.cat(scale).numpy(),
                        input_size)
    return {"coords": np.asarray(img, dtype=np.float32), "scores": torch.cat(scores).numpy(),
            "index": torch.cat(index).numpy()}


def joint_errors(records: list[PersonRecord], preds: dict) -> dict:
    """Mean joint error of visible (v=2) and occluded (v=1) joints, in % of sqrt(box area)."""
    gt = np.stack([records[i].keypoints for i in preds["index"]])            # (N, K, 3)
    size = np.sqrt(np.stack([records[i].bbox[2] * records[i].bbox[3]
                             for i in preds["index"]]))[:, None]             # (N, 1)
    err = np.linalg.norm(preds["coords"] - gt[..., :2], axis=-1) / np.maximum(size, 1e-6) * 100
    out = {}
    for name, v in (("visible", 2), ("occluded", 1)):
        m = gt[..., 2] == v
        out[f"err_{name}"] = float(err[m].mean()) if m.any() else float("nan")
    return out


def results_of(val: ValSet, preds: dict):
    """What ``kdray eval --pred`` reads: COCO keypoint results (a list of dicts), or for PCKh
    the (N, 16, 2) joints of every GT person in GT order."""
    if val.metric == "pckh":
        full = np.zeros((len(val.records),) + preds["coords"].shape[1:], np.float32)
        full[preds["index"]] = preds["coords"]
        return full
    recs = [val.records[i] for i in preds["index"]]
    return to_coco_results([r.image_id for r in recs], preds["coords"], preds["scores"],
                           np.array([r.score for r in recs], np.float32))


def score(val: ValSet, preds: dict) -> dict:
    """Metric dict in percent (the keys of docs/architecture.md, "Command-line contract") plus
    joint errors when GT is known."""
    results = results_of(val, preds)
    if val.metric == "pckh":
        return evaluate_pckh(val.gt_file, results)
    recs = [val.records[i] for i in preds["index"]]
    metrics = evaluate_coco(val.gt_file, results, metric=val.metric,
                            crowd_buckets=val.crowd_buckets)
    if all(r.ann_id >= 0 for r in recs):  # GT boxes: errors against the matching GT person
        metrics.update(joint_errors(val.records, preds))
    return metrics


def merge_predictions(shards: list[dict]) -> dict:
    """The ranks' :func:`predict_dataset` outputs as one, in dataset order (what a single
    process predicts over the whole loader); an index seen twice is a sharding bug."""
    merged = {k: np.concatenate([s[k] for s in shards]) for k in ("coords", "scores", "index")}
    order = np.argsort(merged["index"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    if len(np.unique(merged["index"])) != len(merged["index"]):
        raise ValueError("evaluation shards overlap: an item was predicted on two ranks")
    return merged


def gather_predictions(preds: dict) -> dict | None:
    """Under torch.distributed: every rank's predictions on rank 0 (merged), None elsewhere;
    in a single process, ``preds`` itself."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return preds
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = [None] * world if rank == 0 else None
    dist.gather_object(preds, shards, dst=0)
    return merge_predictions(shards) if rank == 0 else None


def make_evaluator(loader, val: ValSet, flip_test: bool = True):
    """The ``evaluate(task) -> metrics`` callback that kdray.train.fit calls. Under
    torch.distributed every rank predicts its shard of the val set (``loader`` holds that
    shard), rank 0 gathers them and scores once (pycocotools); the other ranks return {}."""
    def evaluate(task) -> dict:
        preds = gather_predictions(predict_dataset(task, loader, val.input_size, flip_test))
        return {} if preds is None else score(val, preds)
    return evaluate
