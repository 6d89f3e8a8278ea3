"""Student + IGP-GCN: precomputed frozen-student inputs (the frozen-output cache) give exactly
the prediction from images; a checkpoint rebuilds a module that predicts the same."""
from __future__ import annotations

import torch

from kdray.codecs.simcc import SimCCCodec
from kdray.config import ModelConfig, to_dict
from kdray.data.frozen_cache import _write, read_shard
from kdray.data.keypoints import COCO
from kdray.inference import model_from_state
from kdray.nn.igp_gcn import IGPGCN
from kdray.nn.pose_model import build_pose_model
from kdray.nn.refined import RefinedPoseModel, gcn_feature_channels

SIZE = (64, 64)


def _refined() -> RefinedPoseModel:
    torch.manual_seed(0)
    student = build_pose_model(ModelConfig(backbone="mobilenetv3_small_100"),
                               SimCCCodec(SIZE, 2.0, 2.0), COCO.flip_index())
    gcn = IGPGCN(17, COCO.skeleton, gcn_feature_channels(student), hidden=16)
    with torch.no_grad():  # trained-like offsets: an untrained GCN returns the student's pose
        for p in gcn.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return RefinedPoseModel(student, gcn).eval()


def _images(n=3):
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(2))


def test_precomputed_inputs_predict_exactly_as_images(tmp_path):
    model, images = _refined(), _images()
    for flip in (False, True):
        frozen = model.frozen_inputs(images, flip_test=flip)
        assert tuple(frozen) == RefinedPoseModel.frozen_keys
        # p_init is the student's own prediction, normalised by (W, H)
        coords, scores = model.student.predict(images, flip_test=flip)
        assert torch.equal(frozen["p_init"][..., :2], coords / torch.tensor([64.0, 64.0]))
        assert torch.equal(frozen["p_init"][..., 2], scores)
        # through a Parquet shard, as the frozen-output cache stores them (float32 columns)
        _write(tmp_path / f"f{flip}.parquet", {k: v.numpy() for k, v in frozen.items()})
        rows = read_shard(tmp_path / f"f{flip}.parquet")
        cached = model.predict(frozen={k: rows[k] for k in model.frozen_keys})
        direct = model.predict(images, flip_test=flip)
        assert torch.equal(cached[0], direct[0]) and torch.equal(cached[1], direct[1])
        assert torch.equal(direct[1], scores)
        assert not torch.equal(direct[0], coords)  # the GCN moved the student's pose


def test_checkpoint_rebuilds_the_same_predictions():
    model, images = _refined(), _images(2)
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()},
             "meta": {"kind": "refined", "model": to_dict(ModelConfig(
                 backbone="mobilenetv3_small_100")), "dataset": "coco", "num_joints": 17,
                 "input_size": list(SIZE), "split_ratio": 2.0, "sigma": 2.0, "gcn_hidden": 16}}
    # the codec is no parameter: the keys are the student's and the GCN's weights
    assert {k.split(".")[1] for k in state["model"]} == {"student", "gcn"}
    rebuilt, _ = model_from_state(state)
    assert isinstance(rebuilt, RefinedPoseModel) and rebuilt.student.codec.input_size == SIZE
    for flip in (False, True):
        a, b = model.predict(images, flip), rebuilt.predict(images, flip)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
