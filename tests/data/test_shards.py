"""Parquet shards of pre-warped crops: same targets as the JPEG path, exact keypoints under
augmentation, reuse by hash, clear errors for missing or corrupt shards."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdray.config import DataConfig
from kdray.data import shards
from kdray.data.coco import DataError, load_coco
from kdray.data.dataset import PoseDataset, SeededSampler, make_loader
from kdray.data.shards import ShardDataset, build_shards, shard_key, train_dataset

TARGETS = ("keypoints", "target_x", "target_y", "target_weight", "visible", "center", "scale",
           "rotation", "image_id", "index", "bbox_score")


@pytest.fixture(scope="module")
def coco(real_data):
    root = real_data / "coco"
    return load_coco(root / "test_coco.json", root)


@pytest.fixture(scope="module")
def synth(synth_root):
    return load_coco(synth_root / "train.json", synth_root / "images")


def _pair(records, spec, tmp_path, train, low=None, **cfg):
    data = dataclasses.replace(DataConfig(), **cfg)
    path = build_shards(records, spec, data, tmp_path / "shards")
    return (PoseDataset(records, spec, data, train=train, low_res_size=low),
            ShardDataset(path, spec, data, train=train, low_res_size=low))


def _image_diff(a, b, key="image"):
    d = (a[key].float() - b[key].float()).abs()
    return float(d.mean()), float(d.max())


def test_no_augmentation_matches_jpeg_path(coco, tmp_path):
    # 256x192 on COCO persons: density 1, the source crop is a pixel copy -> same crops.
    jpeg, shard = _pair(*coco, tmp_path / "a", train=False, input_size=(256, 192))
    for i in range(len(jpeg)):
        a, b = jpeg[i], shard[i]
        for k in TARGETS:
            assert torch.equal(a[k], b[k]), k
        assert _image_diff(a, b)[1] <= 1.0
    # 64x48: the source crop is stored downsampled (density < 1); a second bilinear tap.
    jpeg, shard = _pair(*coco, tmp_path / "b", train=False, input_size=(64, 48))
    assert min(w[3] for w in shard._where) < 1.0
    for i in range(len(jpeg)):
        a, b = jpeg[i], shard[i]
        for k in TARGETS:
            assert torch.equal(a[k], b[k]), k
        assert _image_diff(a, b)[0] < 12.0


def test_augmented_keypoints_exact_and_crop_inside_source(coco, tmp_path):
    # Strong augmentation incl. half-body; targets are bit-identical to the JPEG path, and
    # at density 1 the pixels agree too, i.e. no augmented crop left its source crop.
    jpeg, shard = _pair(*coco, tmp_path, train=True, low=(64, 48), input_size=(256, 192),
                        rotation=45.0, rotation_prob=1.0, half_body_prob=0.5,
                        scale_range=(0.7, 1.35))
    for i in range(len(jpeg)):
        for seed in (1, 2, 3):
            a, b = jpeg[(i, seed)], shard[(i, seed)]
            for k in TARGETS + ("keypoints_low", "target_x_low", "target_weight_low"):
                assert torch.equal(a[k], b[k]), (i, seed, k)
            assert _image_diff(a, b)[1] <= 1.0, (i, seed)
            assert _image_diff(a, b, "image_low")[1] <= 1.0, (i, seed)


def test_synthpose_shards_built_once_and_reused(synth, synth_root, monkeypatch):
    records, spec = synth
    data = dataclasses.replace(DataConfig(), root=str(synth_root), shards="on",
                               input_size=(96, 64))
    ds = train_dataset(records, spec, data)
    assert isinstance(ds, ShardDataset) and ds.path.parent == synth_root / "shards"
    assert ds.path.name == shard_key(records, data) and len(ds) == len(records)
    jpeg = PoseDataset(records, spec, data, train=True)
    for i in range(0, len(records), 7):
        a, b = jpeg[(i, 5)], ds[(i, 5)]
        assert torch.equal(a["target_x"], b["target_x"]) and _image_diff(a, b)[0] < 12.0

    def no_build(job):
        raise AssertionError("shards were rebuilt")
    monkeypatch.setattr(shards, "_write_file", no_build)
    again = train_dataset(records, spec, data)            # same hash: reused
    assert again.path == ds.path
    flip = dataclasses.replace(data, flip_prob=0.1)         # not crop-relevant: same key
    assert shard_key(records, flip) == ds.path.name
    for change in ({"rotation": 10.0}, {"input_size": (128, 96)}, {"padding": 1.3}):
        assert shard_key(records, dataclasses.replace(data, **change)) != ds.path.name
    assert shard_key(records[:-1], data) != ds.path.name   # other records: other key
    assert type(train_dataset(records, spec, dataclasses.replace(data, shards="off"))) \
        is PoseDataset
    # a forked loader worker reads the shards the parent loaded
    batch = next(iter(make_loader(ds, 8, True, num_workers=1, seed=0)))
    keys = list(SeededSampler(len(ds), shuffle=True, seed=0))[:8]     # the loader's first batch
    assert torch.equal(batch["image"], torch.stack([ds[k]["image"] for k in keys]))


def test_missing_and_corrupt_shards_name_the_file(coco, tmp_path):
    records, spec = coco
    data = dataclasses.replace(DataConfig(), input_size=(64, 48))
    path = build_shards(records, spec, data, tmp_path / "s")
    (shard_file,) = sorted(path.glob("*.parquet"))
    table = pq.read_table(shard_file)

    shard_file.write_bytes(shard_file.read_bytes()[:100])          # truncated
    with pytest.raises(DataError, match=f"{shard_file}.*not a readable Parquet"):
        ShardDataset(path, spec, data)
    shard_file.unlink()                                             # missing
    with pytest.raises(DataError, match=f"{shard_file}.*missing"):
        ShardDataset(path, spec, data)
    pq.write_table(table.drop_columns(["keypoints"]), shard_file)   # a column gone
    with pytest.raises(DataError, match="field 'keypoints': missing column"):
        ShardDataset(path, spec, data)
    bad = table.set_column(table.column_names.index("density"), "density",
                           pa.array(np.ones(len(table), np.float32)))
    pq.write_table(bad, shard_file)                                 # a column of another type
    with pytest.raises(DataError, match="field 'density': expected double"):
        ShardDataset(path, spec, data)
    pq.write_table(table.slice(0, 3), shard_file)                   # rows lost
    with pytest.raises(DataError, match="rows"):
        ShardDataset(path, spec, data)
    (path / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json.*did not finish"):
        ShardDataset(path, spec, data)
