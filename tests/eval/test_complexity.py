"""Parameters and FLOPs/MACs (docs/methods.md section 1.5, "Complexity")."""
from __future__ import annotations

import pytest
from torch import nn

from kdray.codecs.simcc import SimCCCodec
from kdray.config import ModelConfig
from kdray.data.keypoints import COCO
from kdray.eval.complexity import complexity
from kdray.nn.pose_model import build_pose_model


def _model(backbone, size):
    return build_pose_model(ModelConfig(backbone=backbone), SimCCCodec(size, 2.0),
                            COCO.flip_index())


def test_golden_single_conv():
    # 1x1 conv 3 -> 4 on a 5x6 image: 3 * 4 * 30 = 360 MACs = 720 FLOPs; 12 weights + 4 biases
    model = nn.Conv2d(3, 4, kernel_size=1)
    c = complexity(model, (5, 6))
    assert c["params"] == 16 and c["flops"] == 720
    assert c["gmacs"] == pytest.approx(360e-9) and c["gflops"] == pytest.approx(720e-9)


def test_pose_model_params_flops_and_mode_restored():
    model = _model("mobilenetv3_small_100", (96, 64))
    model.train()
    c = complexity(model, (96, 64), batch=2)
    assert c["params"] == sum(p.numel() for p in model.parameters())
    assert c["params_m"] == pytest.approx(c["params"] / 1e6)
    # = the backbone's count + the SimCC head by hand, 2 FLOPs per MAC: its input is the 1/16
    # map, 48 x (6 x 4); 1x1 conv 48 -> 17 joints on 24 cells, then Linear 24 -> 128 x-bins and
    # 24 -> 192 y-bins per joint
    head = 2 * (48 * 17 * 24 + 17 * 24 * 128 + 17 * 24 * 192)
    assert head == 300288 and c["flops"] == complexity(model.backbone, (96, 64))["flops"] + head
    assert c["gmacs"] == pytest.approx(c["flops"] / 2e9)
    assert c["flops"] == complexity(model, (96, 64), batch=1)["flops"]  # per image
    assert model.training


@pytest.mark.slow
def test_hrnet_w32_simcc_matches_the_papers():
    # Papers: SimCC HRNet-W32 256x192 ~31M params, ~7.7-8.1 "GFLOPs" (= GMACs, mmcv counting).
    # timm's last stage also fuses into the 1/8-1/32 branches (+0.77M, used by the IGP-GCN).
    model = _model("hrnet_w32", (256, 192))
    c = complexity(model, (256, 192))
    head = sum(p.numel() for p in model.head.parameters())
    assert head == 17 * 32 + 17 + (64 * 48 + 1) * (384 + 512)  # 1x1 conv + two Linear layers
    assert 31.0 < c["params_m"] < 32.5
    assert 7.3 < c["gmacs"] < 8.2
