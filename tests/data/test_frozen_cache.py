"""The frozen-output cache of TSD stage 2: a GCN trial on the shards trains exactly as one that
runs the frozen student and teacher itself (same seed, same augmentation per epoch)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdray.config import load_config, with_overrides
from kdray.data.frozen_cache import FrozenOutputs, epoch_shard, read_shard
from kdray.inference import model_from_checkpoint
from kdray.nn.refined import gcn_feature_indices
from kdray.stage_run import build_frozen_cache, ensure_data, run_stage

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    # One thread for this module, restored afterwards: a bare set_num_threads(1) left every later
    # test of the session on one thread (direct == cached holds with 2 threads as well).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _build_frozen(tmp_path_factory.mktemp("frozen"))
    finally:
        torch.set_num_threads(threads)


def _build_frozen(tmp):
    cfg = load_config(SMOKE, [f"data.root={tmp / 'data'}", "data.max_train=32",
                              "teacher.train.precision=fp32", "ray.num_workers=0",
                              "tsd.stage2.train.epochs=2", "tsd.stage2.mode=teacher"])
    ensure_data(cfg)
    teacher = run_stage("teacher", cfg, tmp / "teacher").checkpoint
    student = run_stage("student", load_config(SMOKE, [
        f"data.root={tmp / 'data'}", "data.max_train=32", "tsd.stage1.feature=false",
        "tsd.stage1.pose=false", "tsd.stage1.structure=false"]), tmp / "student").checkpoint
    inputs = {"teacher": str(teacher), "student": str(student)}
    cache = build_frozen_cache(cfg, inputs, tmp / "cache")
    return cfg, inputs, cache, tmp


def test_shards_hold_every_epoch_in_index_order(frozen):
    cfg, inputs, cache, _ = frozen
    student, _ = model_from_checkpoint(inputs["student"])
    h, w = cfg.data.input_size
    maps = [(32, student.feat_channels[i], h // student.feat_strides[i],
             w // student.feat_strides[i]) for i in gcn_feature_indices(student.feat_strides)]
    for epoch in (1, 2):
        rows = read_shard(epoch_shard(cache, epoch))
        assert rows["index"].tolist() == list(range(32))
        assert rows["p_init"].shape == (32, 17, 3) and rows["teacher_xy"].shape == (32, 17, 2)
        # crop-normalised poses (argmax bin / bins in [0, 1)) and softmax maxima in (0, 1]
        for xy in (rows["p_init"][..., :2], rows["teacher_xy"]):
            assert bool(((xy >= 0) & (xy < 1)).all())
        assert bool(((rows["p_init"][..., 2] > 0) & (rows["p_init"][..., 2] <= 1)).all())
        assert [tuple(rows[f"feat{i}"].shape) for i in range(3)] == maps  # coarse -> fine
    # a different epoch is a different augmentation of the same persons
    e1, e2 = read_shard(epoch_shard(cache, 1)), read_shard(epoch_shard(cache, 2))
    assert not torch.equal(e1["keypoints"], e2["keypoints"])
    assert len(read_shard(Path(cache) / "val.parquet")["index"]) == cfg.data.synth.val


def test_wrong_augmentation_seed_is_refused(frozen):
    ds = FrozenOutputs(frozen[2], "train")
    seed = int(ds.rows["item_seed"][3])
    assert ds[(3, seed)]["index"] == 3
    with pytest.raises(ValueError, match="augmentation seed"):
        ds[(3, seed + 1)]


def test_gcn_on_cache_trains_like_recomputing(frozen):
    cfg, inputs, cache, tmp = frozen
    direct = run_stage("gcn", cfg, tmp / "direct", inputs)
    cached = run_stage("gcn", cfg, tmp / "cached", inputs, frozen=cache)
    assert [h["epoch"] for h in cached.history] == [1, 2]
    for a, b in zip(direct.history, cached.history):
        for key in ("loss", "loss_gcn1", "loss_gcn2", "loss_gcn3"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert cached.metrics["val_AP"] == pytest.approx(direct.metrics["val_AP"], abs=1e-3)
    assert cached.metrics["val_err_occluded"] == pytest.approx(direct.metrics["val_err_occluded"],
                                                               rel=1e-3, nan_ok=True)


def test_a_transfer_set_reaches_the_cache_and_trains_like_recomputing(frozen):
    """tsd.stage2.train.labelled = 16 of 32 (and the student's, which Stage.check asks for):
    the cache keeps each row's ``transfer`` flag and the hidden target weights (0), so the GCN
    on the cache is distilled on the same joints as one that recomputes the networks."""
    cfg, inputs, _, tmp = frozen
    cfg = with_overrides(cfg, {"tsd.stage2.train.labelled": 16, "student.train.labelled": 16})
    cache = build_frozen_cache(cfg, inputs, tmp / "cache-transfer")
    rows = read_shard(epoch_shard(cache, 1))
    assert rows["transfer"].tolist() == [0.0] * 16 + [1.0] * 16
    assert float(rows["target_weight"][16:].abs().sum()) == 0.0
    assert float(rows["target_weight"][:16].sum()) > 0
    direct = run_stage("gcn", cfg, tmp / "direct-transfer", inputs)
    cached = run_stage("gcn", cfg, tmp / "cached-transfer", inputs, frozen=cache)
    for a, b in zip(direct.history, cached.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
