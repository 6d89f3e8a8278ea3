"""Backbones, SimCC head and pose model: shapes, feature order, head init, size checks, weights."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.config import ModelConfig
from kdray.nn.backbones import BACKBONES, build_backbone
from kdray.nn.pose_model import build_pose_model

K = 17


def _model(backbone="hrnet_w18_small", size=(96, 64), k=2.0, **kw):
    torch.manual_seed(0)
    return build_pose_model(ModelConfig(backbone=backbone, **kw), K, size, k)


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
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.contiguous(memory_format=torch.channels_last))
    (out["logits_x"].float().sum() + out["logits_y"].float().sum()).backward()
    assert model.head.mlp_head_x.weight.grad is not None


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
        build_pose_model(ModelConfig(), K, (32, 24), 2.0, size_field="cdkd.low_res_size")
    _model("hrnet_w18_small", (64, 64))  # CDKD's square low-resolution sizes are fine


def test_head_rejects_other_input_sizes():
    model = _model("mobilenetv3_small_100", (96, 64))
    with pytest.raises(ValueError, match="feature map"):
        model(torch.randn(1, 3, 128, 96))
