"""PoseDataset on the real COCO sample: item contract, determinism, paired hi/low-res views."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from kdray.config import DataConfig
from kdray.data.coco import load_coco
from kdray.data.dataset import (PoseDataset, SeededSampler, distillation_mask, make_loader,
                                normalize)
from kdray.data.keypoints import COCO
from kdray.data.transforms import back_to_image, box_to_center_scale

HI, LO = (64, 48), (16, 12)   # small sizes keep the tests fast; ratio 4 like 256x192 -> 64x48


@pytest.fixture(scope="module")
def coco(real_data):
    root = real_data / "coco"
    records, spec = load_coco(root / "test_coco.json", root)
    return records, spec


def _ds(coco, train=True, low=LO, labelled=0, **cfg):
    records, spec = coco
    return PoseDataset(records, spec, dataclasses.replace(DataConfig(), **cfg), train=train,
                       input_size=HI, low_res_size=low, labelled=labelled)


def test_item_contract(coco):
    ds = _ds(coco)
    item = ds[(0, 123)]
    k = 17
    expected = {
        "image": ((3, 64, 48), torch.uint8), "target_x": ((k, 96), torch.float32),
        "target_y": ((k, 128), torch.float32), "target_weight": ((k,), torch.float32),
        "keypoints": ((k, 2), torch.float32), "visible": ((k,), torch.float32),
        "center": ((2,), torch.float32), "scale": ((2,), torch.float32),
        "rotation": ((), torch.float32), "index": ((), torch.int64),
        "image_id": ((), torch.int64), "bbox_score": ((), torch.float32),
        "image_low": ((3, 16, 12), torch.uint8), "keypoints_low": ((k, 2), torch.float32),
        "target_x_low": ((k, 24), torch.float32), "target_y_low": ((k, 32), torch.float32),
        "target_weight_low": ((k,), torch.float32),
    }
    assert set(item) == set(expected)
    for name, (shape, dtype) in expected.items():
        assert tuple(item[name].shape) == shape and item[name].dtype == dtype, name
    assert item["image_id"].item() == coco[0][0].image_id and item["index"].item() == 0
    w = item["target_weight"] > 0
    torch.testing.assert_close(item["target_x"][w].sum(-1), torch.ones(int(w.sum())))
    assert set(_ds(coco, low=None)[0]) == {n for n in expected if not n.endswith("_low")}


def test_a_transfer_set_hides_the_labels_of_the_persons_after_the_first_n(coco):
    """TrainConfig.labelled = 2: persons 0-1 are unchanged; from person 2 on the crop is the
    same (no half-body here) but the labels are hidden: every target weight and visibility is 0
    and ``transfer`` is 1. With half-body crops on, a transfer person never gets one (it would
    be drawn from the hidden joints)."""
    full, part = _ds(coco, half_body_prob=0.0), _ds(coco, labelled=2, half_body_prob=0.0)
    assert "transfer" not in full[(0, 7)]
    for i in range(4):
        a, b = full[(i, 7)], part[(i, 7)]
        assert b["transfer"].item() == float(i >= 2)
        assert set(b) == set(a) | {"transfer"}
        for key in ("image", "image_low", "center", "scale"):
            assert torch.equal(a[key], b[key]), key
        hidden = ("target_weight", "target_weight_low", "visible")
        for key in (*hidden, "keypoints") if i < 2 else hidden:
            assert torch.equal(b[key], a[key] if i < 2 else torch.zeros_like(a[key])), key
        assert (a["target_weight"] > 0).any()
    fixed = {"scale_range": (1.0, 1.0)}
    half = _ds(coco, labelled=2, half_body_prob=1.0, **fixed)
    whole = _ds(coco, labelled=2, half_body_prob=0.0, **fixed)
    for i in range(4):
        a, b = half[(i, 7)]["scale"], whole[(i, 7)]["scale"]
        assert bool((a < b).all()) if i < 2 else torch.equal(a, b), i  # half-body: smaller
    batch = {"target_weight": torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]),
             "transfer": torch.tensor([0.0, 1.0])}
    assert distillation_mask(batch).tolist() == [[True, False, True], [True, True, True]]
    del batch["transfer"]
    assert distillation_mask(batch).tolist() == [[True, False, True], [False, False, False]]


def test_eval_items_are_plain_crops_that_map_back(coco):
    records, _ = coco
    ds = _ds(coco, train=False)
    for i in (0, 5):
        item, rec = ds[i], records[i]
        c, s = box_to_center_scale(rec.bbox, 48 / 64, 1.25)
        np.testing.assert_allclose(item["center"], c)
        np.testing.assert_allclose(item["scale"], s)
        assert item["rotation"].item() == 0.0
        back = back_to_image(item["keypoints"][None], item["center"][None],
                             item["scale"][None], HI)[0]
        lab = rec.keypoints[:, 2] > 0
        assert (back[lab] - torch.from_numpy(rec.keypoints[lab, :2])).abs().max() < 1e-3
        np.testing.assert_array_equal(item["visible"].numpy(), rec.keypoints[:, 2])
    assert torch.equal(ds[3]["image"], ds[3]["image"])


def test_image_is_rgb(coco, tmp_path):
    records, spec = coco
    img = np.zeros((100, 80, 3), np.uint8)
    img[..., 2] = 200                                   # red in BGR order
    cv2.imwrite(str(tmp_path / "red.png"), img)
    rec = dataclasses.replace(records[0], image_path=str(tmp_path / "red.png"),
                              bbox=np.array([10, 10, 60, 80], np.float32))
    item = PoseDataset([rec], spec, DataConfig(), train=False, input_size=HI)[0]
    assert item["image"][0].float().mean() > 150 and item["image"][2].max() == 0


def test_flip_in_dataset_swaps_left_and_right(coco):
    plain = _ds(coco, flip_prob=0.0, rotation_prob=0.0, half_body_prob=0.0, scale_range=(1, 1))
    flip = _ds(coco, flip_prob=1.0, rotation_prob=0.0, half_body_prob=0.0, scale_range=(1, 1))
    a, b = plain[(0, 1)], flip[(0, 1)]
    lw, rw = COCO.joints.index("left_wrist"), COCO.joints.index("right_wrist")
    torch.testing.assert_close(b["keypoints"][lw], torch.stack(
        [48 - a["keypoints"][rw, 0], a["keypoints"][rw, 1]]), atol=1e-4, rtol=0)
    assert torch.equal(b["visible"], a["visible"][COCO.flip_index()])
    # image: column i of the flipped crop = column W - i of the plain one (bilinear rounding)
    diff = (b["image"][..., 1:].int() - a["image"].flip(-1)[..., :-1].int()).abs()
    assert diff.max() <= 1


def test_low_res_view_is_the_same_warp(coco):
    ds = _ds(coco)
    for seed in range(8):                               # flips, rotations, half-body included
        item = ds[(2, seed)]
        torch.testing.assert_close(item["keypoints_low"] * 4, item["keypoints"], atol=1e-4,
                                   rtol=0)
        # Low-res pixel j samples the image where high-res pixel 4j does.
        diff = (item["image_low"].int() - item["image"][:, ::4, ::4].int()).abs()
        assert diff.max() <= 1
        assert item["target_x_low"].shape[-1] * 4 == item["target_x"].shape[-1]
    # Sigma scales with the size by default (same smoothing relative to the crop).
    assert ds.codec_low.sigmas == pytest.approx((ds.codec.sigmas[0] / 4, ds.codec.sigmas[1] / 4))
    # data.sigma is in bins at data.input_size (96x64 by default): 64x48 scales it per axis.
    assert ds.codec.sigmas == pytest.approx((3.0 * 48 / 64, 3.0 * 64 / 96))


def test_train_loader_is_deterministic_and_worker_independent(coco):
    ds = _ds(coco, low=None)

    def epochs(seed, workers):
        loader = make_loader(ds, batch_size=4, train=True, num_workers=workers, seed=seed)
        return [[b["keypoints"].clone() for b in loader] for _ in range(2)]

    a, b, c = epochs(3, 0), epochs(3, 0), epochs(4, 0)
    assert len(a[0]) == len(ds) // 4                     # drop_last in training
    assert all(torch.equal(x, y) for ea, eb in zip(a, b) for x, y in zip(ea, eb))
    assert not torch.equal(a[0][0], c[0][0])             # another seed, other crops
    assert not torch.equal(a[0][0], a[1][0])             # another epoch, other crops
    w = epochs(3, 2)                                     # same batches with 2 worker processes
    assert all(torch.equal(x, y) for ea, ew in zip(a, w) for x, y in zip(ea, ew))


def test_eval_loader_keeps_order_and_every_item(coco):
    ds = _ds(coco, train=False, low=None)
    batches = list(make_loader(ds, batch_size=4, train=False, num_workers=0, seed=0))
    idx = torch.cat([b["index"] for b in batches])
    assert idx.tolist() == list(range(len(ds)))
    assert batches[0]["image"].dtype == torch.uint8


def _shards(n, world, epoch, **kw):
    samplers = [SeededSampler(n, True, seed=1, rank=r, world_size=world, **kw)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return [[i for i, _ in s] for s in samplers]


def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    for epoch in (0, 1):
        whole = _shards(10, 1, epoch)[0]
        train = _shards(10, 3, epoch)
        assert [len(s) for s in train] == [3, 3, 3]           # the same steps on every rank
        flat = [i for s in train for i in s]
        assert len(set(flat)) == 9                             # disjoint
        # the union is the single-process epoch less its tail (10 % 3 = 1 item), and step k
        # of the ranks together is step k of one process with the global batch
        assert sorted(flat) == sorted(whole[:9])
        assert [train[r][0] for r in range(3)] == whole[:3]
    evals = [[i for i, _ in SeededSampler(10, False, rank=r, world_size=3, even=False)]
             for r in range(3)]
    assert evals == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]       # every item once, none padded
    sampler = SeededSampler(10, True, seed=1)
    first = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first                         # set_epoch pins the epoch (resume)


def test_normalize():
    img = torch.tensor([0, 255, 124], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 5)
    out = normalize(img, channels_last=True)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    ref = torch.tensor([(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (124 / 255 - 0.406) / 0.225])
    torch.testing.assert_close(out[0, :, 0, 0], ref)
