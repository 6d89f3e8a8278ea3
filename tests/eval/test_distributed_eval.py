"""Distributed evaluation: ranks predict disjoint shards of the val set, rank 0 merges them and
scores once; the metrics equal the single-process ones exactly (real pycocotools)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdray.data.dataset import SeededSampler
from kdray.eval.runner import ValSet, merge_predictions, score
from kdray.stage_run import load_records


def test_sharded_predictions_score_as_one_process(tiny_cfg):
    _, val_recs, _ = load_records(tiny_cfg)
    d = tiny_cfg.data
    val = ValSet(val_recs, Path(d.root) / d.val_ann, "coco", tuple(d.input_size),
                 crowd_buckets=True)
    rng = np.random.default_rng(0)
    gt = np.stack([r.keypoints[:, :2] for r in val_recs]).astype(np.float32)
    # GT moved by a few pixels per joint: an AP strictly between 0 and 100
    whole = {"coords": gt + rng.normal(0, 3.0, gt.shape).astype(np.float32),
             "scores": rng.uniform(0.3, 1.0, gt.shape[:2]).astype(np.float32),
             "index": np.arange(len(val_recs))}
    ref = score(val, whole)
    assert 5.0 < ref["AP"] < 95.0, ref
    # the shards the Ray workers' eval loaders take (SeededSampler, even=False), each in its
    # own order, as torch.distributed.gather_object hands them to rank 0
    shards = []
    for rank in range(3):
        idx = np.array([i for i, _ in SeededSampler(len(val_recs), False, rank=rank,
                                                    world_size=3, even=False)])
        shards.append({k: v[idx] for k, v in whole.items()})
    assert sum(len(s["index"]) for s in shards) == len(val_recs)
    merged = merge_predictions(shards[::-1])
    assert np.array_equal(merged["index"], whole["index"])
    assert score(val, merged) == ref                      # exactly, every key
    with pytest.raises(ValueError, match="overlap"):
        merge_predictions([shards[0], shards[0]])
