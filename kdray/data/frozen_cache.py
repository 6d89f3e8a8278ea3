"""The frozen networks' outputs for TSD stage 2, computed once and stored as Parquet shards.

In stage 2 (TSD Sec. III-B) only the IGP-GCN learns: the stage-1 student (its initial pose
P_init (K, 3) and three feature maps) and the teacher (its pose, the target of Eq. 6) are frozen.
A sweep over stage 2 (delta, lambda, xi) or several Table IV rows on the same student would
otherwise run both networks on every image of every epoch of every trial. Here they run once
per (dataset, stage-1 student, teacher, augmentation schedule) and every GCN trial reads:

    <dir>/train-e001.parquet ...   one shard per training epoch, rows in dataset-index order:
                                   index, item_seed, the student's outputs as
                                   RefinedPoseModel.frozen_inputs returns them (p_init (K*3),
                                   feat0..feat2 (C*h*w each, coarse -> fine)), keypoints (K*2
                                   crop px), target_weight (K), teacher_xy (K*2 normalised;
                                   TSDStage2Task.teacher_pose, when a teacher is given),
                                   transfer (with TrainConfig.labelled)
    <dir>/val.parquet              the un-augmented val crops (p_init with the flip test when
                                   ``flip_test``), plus center/scale for the back-transform
    <dir>/meta.json                shapes and what the cache was built from

Augmentation stays correct because it is a pure function of (seed, epoch, index): the training
loader's :class:`SeededSampler` draws every item's seed from ``default_rng([seed, epoch])``, and
the dataset draws that item's crop from its seed alone. The cache replays the same sampler for
epoch e, so shard e holds exactly the crops a recomputing trial would see at epoch e; at train
time the same sampler yields (index, seed) again and :class:`FrozenOutputs` checks the seed it
stored. More epochs than cached are added on demand (:func:`ensure_cache`). A batch of rows is
what the stage-2 task feeds its model (``RefinedPoseModel.refine(frozen=...)``) instead of images:
there is no second copy of the student's decoding or of the stage-2 target here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from kdray.data.dataset import PoseDataset, SeededSampler, make_loader, normalize

def epoch_shard(cache_dir: Path, epoch: int) -> Path:
    return Path(cache_dir) / f"train-e{epoch:03d}.parquet"


@torch.no_grad()
def ensure_cache(cache_dir: str | Path, task, train_ds: PoseDataset, val_ds: PoseDataset,
                 seed: int, epochs: int, flip_test: bool, batch_size: int = 64,
                 num_workers: int = 0, channels_last: bool = False) -> Path:
    """Write the shards of epochs 1..``epochs`` (and val) that ``cache_dir`` lacks.

    ``task`` is a built TSDStage2Task (its frozen student and, if any, teacher are used);
    ``train_ds`` the augmented training set and ``seed`` the stage's training seed.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    model, teacher = task.model, task.teacher
    model.student.eval()
    nets = [model.student] + ([teacher] if teacher is not None else [])
    if channels_last:  # the memory format the fit loop would use: the same float results
        for net in nets:
            net.to(memory_format=torch.channels_last)
    sampler = SeededSampler(len(train_ds), shuffle=True, seed=seed)
    for epoch in range(1, epochs + 1):
        if epoch_shard(cache_dir, epoch).exists():
            continue
        sampler.set_epoch(epoch)
        keys = sorted(iter(sampler))          # (index, item_seed), in index order
        _write(epoch_shard(cache_dir, epoch),
               _outputs(task, teacher, train_ds, keys, False, batch_size, num_workers))
    if not (cache_dir / "val.parquet").exists():
        keys = [(i, 0) for i in range(len(val_ds))]
        _write(cache_dir / "val.parquet",
               _outputs(task, None, val_ds, keys, flip_test, batch_size, num_workers))
    return cache_dir


def _outputs(task, teacher, ds, keys, flip_test, batch_size, num_workers) -> dict:
    """Run the frozen networks of ``task`` (a TSDStage2Task) over ``ds[key]`` for ``keys``:
    numpy columns; the teacher's pose only when ``teacher`` is given."""
    model = task.model
    loader = DataLoader(ds, batch_size=batch_size, sampler=keys, num_workers=num_workers)
    cols: dict[str, list] = {}
    for batch in loader:
        images = normalize(batch["image"])
        view = images if task.view == "image" else normalize(batch[task.view])
        out = {**model.frozen_inputs(view, flip_test=flip_test),
               "keypoints": batch["keypoints"], "target_weight": batch["target_weight"],
               "center": batch["center"], "scale": batch["scale"], "index": batch["index"]}
        if "transfer" in batch:  # a transfer-set person (TrainConfig.labelled)
            out["transfer"] = batch["transfer"]
        if teacher is not None:  # the target of stage 2 in mode 'teacher'
            out["teacher_xy"] = task.teacher_pose(images)
        for k, v in out.items():
            cols.setdefault(k, []).append(v.float().numpy() if k != "index" else v.numpy())
    data = {k: np.concatenate(v) for k, v in cols.items()}
    data["item_seed"] = np.asarray([s for _, s in keys], np.int64)
    return data


def _write(path: Path, data: dict) -> None:
    """One shard: fixed-size float32 lists per row; per-row shapes in the schema metadata."""
    arrays, shapes = {}, {}
    for k, v in data.items():
        if v.ndim == 1:
            arrays[k] = pa.array(v)
        else:
            shapes[k] = list(v.shape[1:])
            flat = np.ascontiguousarray(v, dtype=np.float32).reshape(len(v), -1)
            arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    table = pa.table(arrays).replace_schema_metadata({"shapes": json.dumps(shapes)})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=1024)
    tmp.rename(path)


def read_shard(path: str | Path) -> dict[str, torch.Tensor]:
    """A shard as tensors, one row per dataset index: (N, ...) each."""
    table = pq.read_table(path)
    shapes = json.loads(table.schema.metadata[b"shapes"])
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if name in shapes:
            flat = col.values.to_numpy(zero_copy_only=False)
            out[name] = torch.from_numpy(flat.reshape(len(col), *shapes[name]).copy())
        else:
            out[name] = torch.from_numpy(col.to_numpy().copy())
    return out


class FrozenOutputs(Dataset):
    """Rows of the cache; :meth:`set_epoch` (called by the fit loop) loads that epoch's shard.

    Keys are what :class:`SeededSampler` yields, ``(index, item_seed)``: the seed must match
    the one the shard was computed with, or the augmentation would silently differ.
    """

    def __init__(self, cache_dir: str | Path, split: str):
        self.dir, self.split = Path(cache_dir), split
        self.rows: dict[str, torch.Tensor] = {}
        self.epoch = 0
        if split == "val":
            self.rows = read_shard(self.dir / "val.parquet")
        else:
            self.set_epoch(1)

    def set_epoch(self, epoch: int) -> None:
        if self.split == "train" and epoch != self.epoch:
            path = epoch_shard(self.dir, epoch)
            if not path.exists():
                raise FileNotFoundError(f"{path}: epoch {epoch} is not in the frozen-output "
                                        f"cache (build it with ensure_cache)")
            self.rows, self.epoch = read_shard(path), epoch

    def __len__(self) -> int:
        return len(self.rows["index"])

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (
            int(key), None)
        if self.split == "train" and seed is not None and seed != int(self.rows["item_seed"][index]):
            raise ValueError(f"{self.dir}: item {index} of epoch {self.epoch} was cached with "
                             f"another augmentation seed; the cache key is wrong")
        return {k: v[index] for k, v in self.rows.items() if k != "item_seed"}


def cached_loaders(cache_dir: str | Path, batch_size: int, seed: int):
    """Train and val loaders over the cache, in the order the uncached loaders would use
    (in-memory rows: no loader workers, so ``set_epoch`` reaches the dataset)."""
    train = make_loader(FrozenOutputs(cache_dir, "train"), batch_size, True, 0, seed)
    val = make_loader(FrozenOutputs(cache_dir, "val"), batch_size * 2, False, 0, seed)
    return train, val
