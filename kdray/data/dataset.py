"""Person crops with SimCC targets (docs/methods.md section 1), plus the low-res view CDKD needs.

Items stay uint8 until the batch is on the device: :func:`normalize` does mean/std there, so
loader workers move 4x fewer bytes than float32 images would. Randomness comes from a numpy
Generator per item, seeded by :class:`SeededSampler` from (seed, epoch): a run is reproducible
for a given seed and the augmentation does not depend on the number of loader workers.
"""
from __future__ import annotations

import random
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdray.codecs.simcc import SimCCCodec, sigma_for_size
from kdray.data.coco import PersonRecord, read_image
from kdray.data.keypoints import KeypointSpec
from kdray.data.transforms import CropParams, sample_crop, transform_points, warp

__all__ = ["PoseDataset", "SeededSampler", "distillation_mask", "make_loader", "normalize",
           "seed_worker"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PoseDataset(Dataset):
    """Top-down pose dataset over :class:`PersonRecord` s.

    ``dataset[i]`` or ``dataset[(i, seed)]`` (what :class:`SeededSampler` yields) -> dict of
    tensors: image uint8 (3, H, W) RGB; target_x (K, Wx), target_y (K, Hy), target_weight (K,)
    float32; keypoints (K, 2) crop pixels; visible (K,) v in {0, 1, 2}; center (2,), scale (2,),
    rotation () float32; index, image_id int64; bbox_score float32. With ``low_res_size``
    (CDKD) also image_low uint8 (3, h, w), keypoints_low, target_x_low, target_y_low,
    target_weight_low, from the same crop parameters. ``data_cfg.sigma`` (bins) applies at
    ``data_cfg.input_size`` and is scaled per axis for other sizes (``sigma_low`` overrides).
    With ``labelled`` = N > 0 (``TrainConfig.labelled``) every item also has ``transfer``
    float32 (): 1 for the persons from index N on, whose labels are hidden (read as all
    unlabelled: target weights 0, so no task loss, and no half-body crop; see
    :func:`distillation_mask`), 0 for the labelled ones.
    """

    def __init__(self, records: Sequence[PersonRecord], spec: KeypointSpec, data_cfg,
                 train: bool, input_size: tuple[int, int] | None = None,
                 low_res_size: tuple[int, int] | None = None,
                 sigma_low: float | tuple[float, float] | None = None, labelled: int = 0):
        self.records = list(records)
        self.labelled = int(labelled)
        self.spec = spec
        self.cfg = data_cfg
        self.train = bool(train)
        self.input_size = tuple(int(v) for v in (input_size or data_cfg.input_size))
        self.aspect_wh = self.input_size[1] / self.input_size[0]
        # data_cfg.sigma is in bins at data_cfg.input_size; other sizes keep the same smoothing
        # width relative to the crop (docs/methods.md 1.2: "scale sigma with input size").
        ref = tuple(data_cfg.input_size)
        self.codec = SimCCCodec(self.input_size, data_cfg.split_ratio,
                                sigma_for_size(data_cfg.sigma, self.input_size, ref))
        self.flip_index = np.asarray(spec.flip_index(), dtype=np.int64)
        self.low_res_size = tuple(int(v) for v in low_res_size) if low_res_size else None
        self.codec_low = None
        if self.low_res_size:
            s = sigma_low if sigma_low is not None else sigma_for_size(
                data_cfg.sigma, self.low_res_size, ref)
            self.codec_low = SimCCCodec(self.low_res_size, data_cfg.split_ratio, s)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (
            int(key), None)
        rec = self.records[index]
        rng = None
        if self.train:
            # A bare index (e.g. under a foreign sampler) falls back to the numpy global state,
            # which seed_worker reseeds per worker.
            rng = np.random.default_rng(seed if seed is not None else
                                        np.random.randint(0, 2**62, dtype=np.int64))
        transfer = 0 < self.labelled <= index
        # A transfer person's labels are hidden from everything: the half-body crop, the
        # targets (weight 0 for v = 0), the keypoints and visibility of the item.
        keypoints = np.zeros_like(rec.keypoints) if transfer else rec.keypoints
        crop = sample_crop(rec.bbox, keypoints, self.spec, self.cfg, self.aspect_wh, rng)
        image, to_source = self.load_source(index)  # BGR; RGB on the (smaller) crop
        item = self._view(image, crop, keypoints, self.input_size, self.codec, "", to_source)
        if self.low_res_size:
            # Warp the source again with an affine composed for the low size, rather than
            # resizing the high-res crop: one interpolation from the original pixels (no double
            # blur) and keypoints that are exactly keypoints * low/high (transforms.py).
            item.update(self._view(image, crop, keypoints, self.low_res_size,
                                   self.codec_low, "_low", to_source))
        item.update(
            center=torch.from_numpy(np.asarray(crop.center, np.float32)),
            scale=torch.from_numpy(np.asarray(crop.scale, np.float32)),
            rotation=torch.tensor(crop.rotation, dtype=torch.float32),
            index=torch.tensor(index, dtype=torch.int64),
            image_id=torch.tensor(rec.image_id, dtype=torch.int64),
            bbox_score=torch.tensor(rec.score, dtype=torch.float32))
        if self.labelled:
            item["transfer"] = torch.tensor(float(transfer))
        return item

    def load_source(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The pixels crops are warped from: BGR uint8 (H, W, 3), and the (2, 3) affine from
        image to source pixels (None: the source is the image). ``ShardDataset``
        (kdray/data/shards.py) returns a pre-warped crop and its affine instead."""
        return read_image(self.records[index].image_path), None

    def _view(self, image: np.ndarray, crop: CropParams, keypoints: np.ndarray,
              size: tuple[int, int], codec: SimCCCodec, suffix: str,
              to_source: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        m = crop.affine(size)
        # Keypoints always go through m (image -> crop); pixels come from the source, so the
        # warp uses m . to_source^-1 (source -> crop), exact up to float64 rounding.
        patch = warp(image, m if to_source is None else _compose_inverse(m, to_source), size)
        chw = np.ascontiguousarray(patch[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
        kp = transform_points(keypoints[:, :2], m)
        vis = keypoints[:, 2].astype(np.float32)
        if crop.flip:  # the mirrored left wrist is now the right wrist: swap rows
            kp, vis = kp[self.flip_index], vis[self.flip_index]
        tx, ty, weight = codec.encode(kp, vis)
        out = {"image": torch.from_numpy(chw), "keypoints": torch.from_numpy(kp),
               "target_x": torch.from_numpy(tx), "target_y": torch.from_numpy(ty),
               "target_weight": torch.from_numpy(weight)}
        if not suffix:
            out["visible"] = torch.from_numpy(vis)
        return {k + suffix: v for k, v in out.items()}


def distillation_mask(batch: dict, suffix: str = "") -> torch.Tensor:
    """(B, K) bool: the joints a distillation term compares. The papers' mask M, the
    GT-labelled joints, for a labelled person; every joint of a transfer-set person (``transfer``
    = 1), whose only supervision is the teacher."""
    mask = batch["target_weight" + suffix] > 0
    if "transfer" in batch:
        mask = mask | (batch["transfer"] > 0)[:, None]
    return mask


def _compose_inverse(m: np.ndarray, a: np.ndarray) -> np.ndarray:
    """(2, 3) affine ``m . a^-1`` for (2, 3) affines ``m`` and invertible ``a``."""
    full = np.vstack([np.asarray(a, np.float64), [0.0, 0.0, 1.0]])
    return (np.vstack([m, [0.0, 0.0, 1.0]]) @ np.linalg.inv(full))[:2]


def normalize(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, 3, H, W) or (3, H, W) RGB in [0, 255] -> float32 ImageNet-normalised.

    Meant to run on the device after collation. One fused subtract/divide with the constants
    pre-scaled by 255.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(-1, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=images.device).view(-1, 1, 1) * 255.0
    out = (images.float() - mean) / std
    if channels_last and out.dim() == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class SeededSampler(Sampler):
    """Yields ``(index, item_seed)``; order and seeds come from ``default_rng([seed, epoch])``.

    The epoch advances on every ``iter()``; :meth:`set_epoch` pins it (resume). With
    ``world_size > 1`` rank r takes every world_size-th index of the order starting at r
    (pass ``add_dist_sampler=False`` to Ray's ``prepare_data_loader``): the ranks' shares are
    disjoint. ``even`` (training) drops the order's last ``n % world_size`` indices so every
    rank runs as many steps (DDP's all-reduce is a barrier per step) and the union is the
    epoch a single process would train on with ``drop_last``; without it (evaluation) the
    shares differ by at most one and their union is every index.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 even: bool = True):
        self.n, self.shuffle, self.seed = int(n), bool(shuffle), int(seed)
        self.rank, self.world_size, self.even = int(rank), int(world_size), bool(even)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.even:
            return self.n // self.world_size
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = rng.integers(0, 2**62, size=self.n)
        if self.even:
            order = order[:len(self) * self.world_size]
        idx = order[self.rank::self.world_size]
        return iter([(int(i), int(seeds[i])) for i in idx])


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: reseed numpy/random from torch's per-worker seed (torch itself
    already runs one intra-op thread per worker). No OpenCV call here: see make_loader."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def seed_fresh_worker(worker_id: int) -> None:
    """:func:`seed_worker` for a worker started by ``spawn``/``forkserver``: a fresh process,
    so OpenCV's thread pool is its own and one thread is set here (no fork hazard)."""
    cv2.setNumThreads(1)
    seed_worker(worker_id)


def make_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int,
                pin_memory: bool | None = None, drop_last: bool | None = None,
                rank: int = 0, world_size: int = 1, mp_context: str | None = None
                ) -> DataLoader:
    """A deterministic loader: shuffled by :class:`SeededSampler` in training, in order otherwise.

    ``drop_last`` defaults to ``train`` (unless that would leave no batch at all);
    ``pin_memory`` to whether CUDA is available; workers persist across epochs. With workers,
    OpenCV is switched to one thread in this process (inherited by the forked workers).
    ``mp_context``: how worker processes start (None = the platform's default, fork on Linux);
    a Ray worker passes ``forkserver``, as Ray's docs ask: forking a process that runs Ray's
    threads and gRPC clients can deadlock the child.
    """
    sampler = SeededSampler(len(dataset), shuffle=train, seed=seed, rank=rank,
                            world_size=world_size, even=train)
    if drop_last is None:
        drop_last = bool(train) and len(sampler) >= batch_size
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    fresh = num_workers > 0 and mp_context in ("spawn", "forkserver")
    if num_workers > 0 and not fresh:
        # One OpenCV thread per worker (the workers are the parallelism). It must be set here,
        # in the parent, before the fork: OpenCV's pthreads pool is not fork-safe, and calling
        # cv2.setNumThreads inside a forked worker deadlocked about 1 run in 10 (measured).
        # The main process keeps this setting.
        cv2.setNumThreads(1)
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last,
                      worker_init_fn=seed_fresh_worker if fresh else seed_worker,
                      generator=gen, persistent_workers=num_workers > 0,
                      multiprocessing_context=mp_context if num_workers > 0 else None)
