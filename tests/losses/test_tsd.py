"""Golden tests for the TSD losses, Eqs. (1)-(7): every expected value is worked out by hand in
the comments from tiny tensors (2-3 joints, 1-2 edges)."""
from __future__ import annotations

import pytest
import torch

from kdray.losses.tsd import (edge_weights, feature_mse, gamma, gcn_block_loss,
                              make_feature_adapter, mean_edge_lengths, pose_l1, skeleton_edges,
                              stage1_loss, stage2_loss, structure_loss)

T = torch.tensor
# Hand values vs fp32 results: inputs such as 0.1 are inexact (u = 6e-8) and lengths and
# errors subtract, so a result can be ~10 u = 6e-7 relative off, pytest's default rel=1e-6.
# rel=1e-5 allows any summation order or FMA a CPU picks; a wrong weight, term or mask is
# >= 1% off. abs=1e-7 only for results that are 0.
FP32 = {"rel": 1e-5, "abs": 1e-7}


def _adapter(weight: list[float], bias: list[float]) -> torch.nn.Conv2d:
    conv = make_feature_adapter(len(weight[0]), len(weight))
    with torch.no_grad():
        conv.weight.copy_(T(weight).reshape(len(weight), len(weight[0]), 1, 1))
        conv.bias.copy_(T(bias))
    return conv


# ---- Eq. (1) ---------------------------------------------------------------------------------

def test_feature_mse_golden_same_size():
    # student (1, Cs=1, 1, 2) = [1, 2]; adapter 1 -> 2 channels: w = (2, -1), b = (0, 1)
    #   channel 0: 2*[1, 2] + 0 = [2, 4];  channel 1: -[1, 2] + 1 = [0, -1]
    # teacher channel 0 = [1, 4], channel 1 = [0, 1]
    #   squared errors (1-2)^2=1, (4-4)^2=0, (0-0)^2=0, (1+1)^2=4 -> sum 5, CHW = 2*1*2 = 4
    # sample 1: L = 5/4 = 1.25. Sample 2: student [0, 0] -> adapted [0, 0], [1, 1];
    #   teacher [0, 0], [1, 3] -> errors 0, 0, 0, 4 -> 4/4 = 1.0.  Batch mean (1.25 + 1)/2 = 1.125
    adapter = _adapter([[2.0], [-1.0]], [0.0, 1.0])
    student = T([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])                       # (2, 1, 1, 2)
    teacher = T([[[[1.0, 4.0]], [[0.0, 1.0]]], [[[0.0, 0.0]], [[1.0, 3.0]]]])   # (2, 2, 1, 2)
    assert feature_mse(student[:1], teacher[:1], adapter).item() == pytest.approx(1.25, **FP32)
    assert feature_mse(student, teacher, adapter).item() == pytest.approx(1.125, **FP32)


def test_feature_mse_resizes_student_to_teacher():
    # student (1, 1, 1, 1) = 3, identity adapter -> bilinear resize to 2x2 is constant 3
    # teacher [[3, 4], [5, 3]] -> errors 0, 1, 4, 0 -> 5 / (1*2*2) = 1.25
    adapter = _adapter([[1.0]], [0.0])
    loss = feature_mse(T([[[[3.0]]]]), T([[[[3.0, 4.0], [5.0, 3.0]]]]), adapter)
    assert loss.item() == pytest.approx(1.25, **FP32)
    loss.backward()
    # the 1x1 output a = 3w + b is spread over the 4 pixels: dL/da = 2 sum(a - t) / 4 = -1.5
    # (errors 0, -1, -2, 0), so dL/dw = 3 * -1.5 = -4.5 and dL/db = -1.5
    assert adapter.weight.grad.item() == pytest.approx(-4.5, **FP32)
    assert adapter.bias.grad.item() == pytest.approx(-1.5, **FP32)


def test_feature_mse_channel_mismatch_raises():
    with pytest.raises(ValueError, match="channels"):
        feature_mse(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2), make_feature_adapter(2, 4))


# ---- Eq. (2), first term ---------------------------------------------------------------------

TEA = T([[[0.2, 0.3], [0.5, 0.7]]])                                     # (1, 2, 2)


def test_pose_l1_golden_with_mask():
    # sample 1: student (0.25, 0.1) vs teacher (0.2, 0.3): |0.05| + |0.2| = 0.25; joint 2 masked
    #   -> 0.25 / 1 labelled joint = 0.25
    # sample 2: student (0.3, 0.3): 0.1 + 0 = 0.1; (0.5, 0.4) vs (0.5, 0.7): 0 + 0.3 = 0.3
    #   batch: (0.25 + 0.1 + 0.3) / 3 labelled joints = 0.65 / 3
    stu = T([[[0.25, 0.1], [0.9, 0.9]], [[0.3, 0.3], [0.5, 0.4]]])
    tea = TEA.expand(2, 2, 2)
    mask = T([[1.0, 0.0], [1.0, 1.0]])
    assert pose_l1(stu[:1], tea[:1], mask[:1]).item() == pytest.approx(0.25, **FP32)
    assert pose_l1(stu, tea, mask).item() == pytest.approx(0.65 / 3, **FP32)


def test_pose_l1_empty_mask_is_zero_and_finite():
    stu = torch.rand(2, 2, 2, requires_grad=True)
    loss = pose_l1(stu, torch.rand(2, 2, 2), torch.zeros(2, 2))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(stu.grad).all()


# ---- Eq. (3) and the edge weights ------------------------------------------------------------

# teacher: j0 (0.2, 0.3), j1 (0.5, 0.7), j2 (0.5, 0.1)
#   edge (0, 1): dx 0.3, dy 0.4 -> 0.5;  edge (1, 2): dy 0.6 -> 0.6
# student: j0 (0.1, 0.1), j1 (0.7, 0.9), j2 (0.7, 0.6)
#   edge (0, 1): dx 0.6, dy 0.8 -> 1.0;  edge (1, 2): dy 0.3 -> 0.3
#   |0.5 - 1.0| = 0.5,  |0.6 - 0.3| = 0.3
TEA3 = T([[[0.2, 0.3], [0.5, 0.7], [0.5, 0.1]]])
STU3 = T([[[0.1, 0.1], [0.7, 0.9], [0.7, 0.6]]])
SKEL = ((0, 1), (1, 2))


def test_structure_loss_single_edge():
    # 2 joints, one edge, uniform weight 1/1: |0.5 - 1.0| = 0.5
    edges = skeleton_edges([(0, 1)])
    w = edge_weights([(0, 1)])
    loss = structure_loss(STU3[:, :2], TEA3[:, :2], edges, w, torch.ones(1, 2))
    assert loss.item() == pytest.approx(0.5, **FP32)


def test_structure_loss_uniform_weights():
    # w = (1/2, 1/2): 0.5 * 0.5 + 0.5 * 0.3 = 0.4
    w = edge_weights(SKEL, "uniform")
    assert w.tolist() == pytest.approx([0.5, 0.5], **FP32)
    loss = structure_loss(STU3, TEA3, skeleton_edges(SKEL), w, torch.ones(1, 3))
    assert loss.item() == pytest.approx(0.4, **FP32)


def test_structure_loss_inverse_length_weights():
    # mean lengths (0.5, 0.25) -> 1/l = (2, 4) -> w = (1/3, 2/3)
    # loss = 0.5/3 + 0.3 * 2/3 = 0.1666.. + 0.2 = 0.3666..
    w = edge_weights(SKEL, "inverse_length", mean_lengths=T([0.5, 0.25]))
    assert w.tolist() == pytest.approx([1 / 3, 2 / 3], **FP32)
    loss = structure_loss(STU3, TEA3, skeleton_edges(SKEL), w, torch.ones(1, 3))
    assert loss.item() == pytest.approx(0.5 / 3 + 0.2, **FP32)


def test_structure_loss_mask_and_batch_average():
    # sample 1 all labelled: 0.4 (uniform, above). Sample 2 the same poses with j2 unlabelled:
    # only edge (0, 1) counts: 0.5 * 0.5 = 0.25 (weights not renormalised).  Batch (0.4+0.25)/2
    stu, tea = STU3.expand(2, 3, 2), TEA3.expand(2, 3, 2)
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss = structure_loss(stu, tea, skeleton_edges(SKEL), edge_weights(SKEL), mask)
    assert loss.item() == pytest.approx(0.325, **FP32)


def test_structure_loss_finite_gradient_at_coincident_joints():
    # all student joints at the crop centre (uniform logits): zero-length edges, no NaN
    stu = torch.full((1, 3, 2), 0.5, requires_grad=True)
    loss = structure_loss(stu, TEA3, skeleton_edges(SKEL), edge_weights(SKEL), torch.ones(1, 3))
    loss.backward()
    # abs=1e-5: each zero-length edge is sqrt(0 + 1e-12) = 1e-6 long (the eps), not fp32 noise
    assert loss.item() == pytest.approx(0.5 * 0.5 + 0.5 * 0.6, abs=1e-5)
    assert torch.isfinite(stu.grad).all()


def test_mean_edge_lengths_counts_labelled_pairs_only():
    # sample 1: j0 (0, 0) v2, j1 (0.3, 0.4) v2, j2 unlabelled -> edge (0,1) = 0.5, (1,2) skipped
    # sample 2: j0 (0, 0) v1, j1 (0, 0.6) v2, j2 (0.8, 0.6) v2 -> (0,1) = 0.6, (1,2) = 0.8
    # means: (0.5 + 0.6)/2 = 0.55, 0.8
    kp = T([[[0.0, 0.0, 2], [0.3, 0.4, 2], [0.3, 0.4, 0]],
            [[0.0, 0.0, 1], [0.0, 0.6, 2], [0.8, 0.6, 2]]])
    assert mean_edge_lengths(kp, SKEL).tolist() == pytest.approx([0.55, 0.8], **FP32)
    # sample 1 alone: edge (1, 2) never labelled -> the mean of the other edges, 0.5
    # (numpy input accepted: the helper runs over a dataset's records)
    assert mean_edge_lengths(kp[:1].numpy(), SKEL).tolist() == pytest.approx([0.5, 0.5], **FP32)


def test_edge_weights_errors():
    with pytest.raises(ValueError, match="mean_lengths"):
        edge_weights(SKEL, "inverse_length")
    with pytest.raises(ValueError, match="unknown"):
        edge_weights(SKEL, "bogus")


# ---- Eqs. (4) and (5) ------------------------------------------------------------------------

def test_gamma_endpoints():
    assert gamma(1, 210) == 1.0                       # 1 - 0/210
    assert gamma(210, 210) == pytest.approx(1 / 210)  # 1 - 209/210
    assert gamma(3, 4) == 0.5                         # 1 - 2/4
    with pytest.raises(ValueError):
        gamma(0, 10)
    with pytest.raises(ValueError):
        gamma(11, 10)


def test_stage1_loss_combination():
    # 2 + 0.5 * 5e-5 * 100 + 0.5 * 0.1 * 3 = 2 + 0.0025 + 0.15 = 2.1525
    loss = stage1_loss(T(2.0), T(100.0), T(3.0), gamma_t=0.5, alpha=5e-5, beta=0.1)
    assert loss.item() == pytest.approx(2.1525, **FP32)


# ---- Eqs. (6) and (7) ------------------------------------------------------------------------

def test_gcn_block_loss_golden_with_mask():
    # P_i (0.25, 0.1), (0.9, 0.9) vs P_tea (0.2, 0.3), (0.5, 0.7); M = (1, 0)
    #   |(0.2-0.25)| + |(0.3-0.1)| = 0.25 for joint 1, joint 2 masked out -> 0.25 / 1
    pred = T([[[0.25, 0.1], [0.9, 0.9]]], requires_grad=True)
    loss = gcn_block_loss(pred, TEA, T([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.25, **FP32)
    loss.backward()
    assert pred.grad[0, 1].abs().sum() == 0         # the masked joint gets no gradient
    assert pred.grad[0, 0].tolist() == pytest.approx([1.0, -1.0], **FP32)   # sign(pred - target)


def test_stage2_loss_weights():
    # 0.3 * 1 + 0.5 * 2 + 1.0 * 4 = 0.3 + 1.0 + 4.0 = 5.3
    assert stage2_loss([T(1.0), T(2.0), T(4.0)]).item() == pytest.approx(5.3, **FP32)
    assert stage2_loss([T(1.0), T(2.0)], weights=(1.0, 0.5)).item() == pytest.approx(2.0, **FP32)
    with pytest.raises(ValueError):
        stage2_loss([T(1.0)])
