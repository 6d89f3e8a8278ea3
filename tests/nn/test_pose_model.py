"""Backbones, SimCC head and pose model: shapes, feature order, head init, size checks, weights."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.codecs.simcc import SimCCCodec
from kdray.config import ModelConfig
from kdray.data.keypoints import COCO
from kdray.nn.backbones import BACKBONES, build_backbone
from kdray.nn.pose_model import build_pose_model

K = 17


def _model(backbone="hrnet_w18_small", size=(96, 64), k=2.0, **kw):
    torch.manual_seed(0)
    return build_pose_model(ModelConfig(backbone=backbone, **kw), SimCCCodec(size, k),
                            COCO.flip_index())


@pytest.mark.parametrize("size", [(96, 64), (128, 96)])
@pytest.mark.parametrize("backbone, strides, channels", [
    ("hrnet_w18_small", [32, 16, 8, 4], [128, 64, 32, 16]),       # branches low -> high res
    ("mobilenetv3_small_100", [4, 8, 16], [16, 24, 48]),          # forward order, cut at 1/16
])
def test_shapes_and_feature_order(backbone, strides, channels, size):
    model = _model(backbone, size)
    h, w = size
    out = model(torch.randn(2, 3, h, w))
    assert model.feat_strides == strides and model.feat_channels == channels
    assert [tuple(f.shape) for f in out["feats"]] == [(2, c, h // s, w // s)
                                                      for c, s in zip(channels, strides)]
    assert out["logits_x"].shape == (2, K, int(w * 2.0))
    assert out["logits_y"].shape == (2, K, int(h * 2.0))
    assert model.bins == (int(w * 2.0), int(h * 2.0))


def test_hrnet_gcn_maps_are_the_last_three_and_head_reads_the_quarter_map():
    model = _model("hrnet_w32", (64, 64))
    assert model.feat_strides[-3:] == [16, 8, 4] and model.feat_channels == [256, 128, 64, 32]
    assert model.head.final_layer.in_channels == model.feat_channels[-1]


def test_non_integer_split_ratio_truncates_bins():
    out = _model("mobilenetv3_small_100", (96, 64), k=1.5)(torch.randn(1, 3, 96, 64))
    assert out["logits_x"].shape[-1] == 96 and out["logits_y"].shape[-1] == 144


def _entropy_ratio(logits: torch.Tensor, beta: float = 10.0) -> float:
    """Mean entropy of softmax(beta * logits) over log(bins): 1.0 = uniform."""
    p = torch.softmax(logits * beta, dim=-1)
    return float(-torch.special.xlogy(p, p).sum(-1).mean() / math.log(p.shape[-1]))


def test_small_head_init_starts_near_uniform():
    # train mode, as at the first step: BatchNorm uses batch statistics (fresh running statistics
    # in eval mode let a random HRNet's activations grow ~10x, which says nothing about training)
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(1))
    ratios = {}
    for scale in (0.0, 0.1, 1.0):
        model = _model(head_init_scale=scale).train()
        assert torch.count_nonzero(model.head.mlp_head_x.bias) == 0
        with torch.no_grad():
            ratios[scale] = _entropy_ratio(model(x)["logits_x"])
    assert ratios[0.0] == pytest.approx(1.0, abs=1e-6)    # zero weights: exactly uniform
    assert ratios[0.1] > 0.75                               # the default: close to uniform
    assert ratios[1.0] < 0.5 * ratios[0.1]                 # PyTorch's default: sharply peaked


def test_channels_last_and_bf16_autocast_run():
    model = _model("mobilenetv3_small_100").eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        ref = model(x)["logits_x"]
        cl = model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))["logits_x"]
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-4)
    model.train()
    grads = []
    for dtype in (torch.float32, torch.bfloat16):    # fp32 first: the reference gradient
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(x.contiguous(memory_format=torch.channels_last))
        assert out["logits_x"].dtype == out["logits_y"].dtype == torch.float32  # head in fp32
        (out["logits_x"].sum() + out["logits_y"].sum()).backward()
        grads.append(model.head.mlp_head_x.weight.grad.clone())
    # bf16 backbone (8-bit mantissa, ~0.4% per op, compounded over the layers and BN on a
    # batch of 2): measured 4% relative error on the head's gradient; a head that got no or
    # a wrong gradient is off by ~100%
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 0.1


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(ValueError, match="known: .*hrnet_w32.*mobilenetv3_small_100"):
        build_backbone("hrnet_w31")
    assert set(BACKBONES) >= {"hrnet_w18_small", "hrnet_w18_small_v2", "hrnet_w32", "hrnet_w48",
                              "resnet18", "resnet50", "mobilenetv3_small_100",
                              "mobilenetv3_large_100"}


def test_hrnet_needs_sizes_divisible_by_32():
    with pytest.raises(ValueError, match=r"data\.input_size = \(64, 48\).*divisible by 32"):
        _model("hrnet_w18_small", (64, 48))
    with pytest.raises(ValueError, match=r"cdkd\.low_res_size"):
        build_pose_model(ModelConfig(), SimCCCodec((32, 24), 2.0), COCO.flip_index(),
                         size_field="cdkd.low_res_size")
    _model("hrnet_w18_small", (64, 64))  # CDKD's square low-resolution sizes are fine


def test_head_rejects_other_input_sizes():
    model = _model("mobilenetv3_small_100", (96, 64))
    with pytest.raises(ValueError, match="feature map"):
        model(torch.randn(1, 3, 128, 96))


def _reference_decode(lx, ly, k):
    """argmax / k and min over the axes of max softmax(10 * logits): docs/methods.md 1.2,
    written out here independently of SimCCCodec.decode."""
    conf_x, bx = torch.softmax(10.0 * lx, -1).max(-1)
    conf_y, by = torch.softmax(10.0 * ly, -1).max(-1)
    return torch.stack([bx, by], -1).float() / k, torch.minimum(conf_x, conf_y)


def test_predict_decodes_its_own_logits_with_and_without_flip_test():
    model = _model("mobilenetv3_small_100", (64, 48)).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 48, generator=g)
    with torch.no_grad():
        out, mirrored = model(images), model(images.flip(-1))
    lx, ly = out["logits_x"], out["logits_y"]
    coords, scores = model.predict(images, flip_test=False)
    ref_coords, ref_scores = _reference_decode(lx, ly, 2.0)
    assert torch.equal(coords, ref_coords) and torch.equal(scores, ref_scores)
    # flip test by hand: joints swapped left <-> right, x bin b of the mirrored crop read at
    # (W - 1) k - b = 94 - b (W = 48, k = 2); bin 95 has no source and repeats bin 0's value
    fx = mirrored["logits_x"][:, COCO.flip_index()]
    src = (94 - torch.arange(96)).clamp(min=0)
    fx, fy = fx[..., src], mirrored["logits_y"][:, COCO.flip_index()]
    ref_coords, ref_scores = _reference_decode((lx + fx) / 2, (ly + fy) / 2, 2.0)
    coords, scores = model.predict(images, flip_test=True)
    assert torch.equal(coords, ref_coords) and torch.equal(scores, ref_scores)
    assert not torch.equal(coords, model.predict(images, flip_test=False)[0])  # flip mattered
    # the codec decodes; it is no parameter: the state dict holds weights only
    assert model.codec == SimCCCodec((64, 48), 2.0) and model.flip_index == COCO.flip_index()
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "head"}
