"""L_KL, the SimCC task loss: hand-computed golden values, weights, minimum, numerical safety."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.losses.simcc import simcc_kl_loss, simcc_kl_per_joint

BETA = 10.0


def _t(*rows):  # (1, K, bins) from K rows
    return torch.tensor([list(rows)], dtype=torch.float32)


def test_golden_three_bins():
    # Joint 0, x axis: beta*z = [0, 0, ln 2] -> q = [1/4, 1/4, 1/2]; t = [0, 1/2, 1/2]
    #   KL = 0 (0 log 0) + 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(1/2)) = 1/2 ln 2
    # Joint 0, y axis: beta*z = [0, 0, 0] -> q = 1/3 each; t = [1, 0, 0]  ->  KL = ln 3
    # Joint 1 (weight 1), x: beta*z = [ln 2, 0, 0] -> q = [1/2, 1/4, 1/4]; t = [1/4, 1/4, 1/2]
    #   KL = 1/4 ln(1/2) + 1/4 ln 1 + 1/2 ln 2 = 1/4 ln 2;  y: z = 0, t = 1/3 each -> KL = 0
    # Joint 2 has weight 0: excluded from the sum and from the count.
    # L = ((1/2 ln 2 + ln 3) + (1/4 ln 2 + 0)) / 2 labelled joints = (3/4 ln 2 + ln 3) / 2
    ln2 = math.log(2.0)
    lx = _t([0, 0, ln2], [ln2, 0, 0], [5, -3, 1]) / BETA
    ly = _t([0, 0, 0], [0, 0, 0], [0, 9, 0]) / BETA
    tx = _t([0, .5, .5], [.25, .25, .5], [1, 0, 0])
    ty = _t([1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [1, 0, 0])
    w = torch.tensor([[1.0, 1.0, 0.0]])
    expected = (0.75 * ln2 + math.log(3.0)) / 2
    # fp32 (u = 6e-8): log_softmax's exp/log are ~1 ulp per element (vectorised per CPU), ~6
    # terms of size ~0.7 -> up to ~5e-7 relative; rel=1e-5 is CPU-proof, a wrong term is >= 10%
    assert simcc_kl_loss(lx, ly, tx, ty, w, scale=BETA).item() == pytest.approx(expected, rel=1e-5)
    per_joint = simcc_kl_per_joint(lx, tx, BETA)[0, :2]
    torch.testing.assert_close(per_joint, torch.tensor([ln2 / 2, ln2 / 4]))


def _random_case(b=3, k=4, wx=12, hy=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lx, ly = torch.randn(b, k, wx, generator=g), torch.randn(b, k, hy, generator=g)
    tx = torch.softmax(torch.randn(b, k, wx, generator=g), -1)
    ty = torch.softmax(torch.randn(b, k, hy, generator=g), -1)
    return lx, ly, tx, ty


def test_weight_zero_joints_contribute_nothing():
    lx, ly, tx, ty = _random_case()
    lx.requires_grad_(True)
    w = torch.ones(3, 4)
    w[0, 1] = w[2, 3] = 0.0
    base = simcc_kl_loss(lx, ly, tx, ty, w)
    lx2 = lx.detach().clone()
    lx2[0, 1] += 100.0  # garbage on an unlabelled joint changes nothing
    assert simcc_kl_loss(lx2, ly, tx, ty, w).item() == pytest.approx(base.item(), rel=1e-6)
    base.backward()
    assert torch.count_nonzero(lx.grad[0, 1]) == 0 and torch.count_nonzero(lx.grad[2, 3]) == 0
    # no labelled joint at all: exactly 0, no NaN, still differentiable
    zero = simcc_kl_loss(lx, ly, tx, ty, torch.zeros(3, 4))
    assert zero.item() == 0.0 and zero.requires_grad


def test_minimised_when_beta_logits_equal_log_target():
    _, _, tx, ty = _random_case()
    w = torch.ones(3, 4)
    lx = (tx.log() / BETA).requires_grad_(True)
    ly = (ty.log() / BETA).requires_grad_(True)
    loss = simcc_kl_loss(lx, ly, tx, ty, w)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    assert lx.grad.abs().max() < 1e-5 and ly.grad.abs().max() < 1e-5
    for seed in range(3):  # any perturbation increases it (KL >= 0, = 0 only at q = t)
        d = 0.05 * torch.randn(lx.shape, generator=torch.Generator().manual_seed(seed))
        assert simcc_kl_loss(lx.detach() + d, ly.detach(), tx, ty, w).item() > loss.item() + 1e-6


def test_safe_with_hard_targets_large_logits_and_bf16():
    lx, ly, tx, ty = _random_case()
    tx = torch.zeros_like(tx)
    tx[..., 0] = 1.0  # one-hot: every other bin has t = 0
    loss = simcc_kl_loss((lx * 1e3).bfloat16(), ly.bfloat16(), tx, ty, torch.ones(3, 4))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_scale_free_in_batch_and_count():
    lx, ly, tx, ty = _random_case(b=2)
    w = torch.ones(2, 4)
    single = simcc_kl_loss(lx, ly, tx, ty, w)
    doubled = simcc_kl_loss(*(torch.cat([t, t]) for t in (lx, ly, tx, ty)), torch.ones(4, 4))
    # fp32 sums of 8 vs 16 positive per-joint terms, in an order set by the CPU's vector width:
    # <= 15 u ~ 1e-6 relative worst case; rel=1e-5 (a batch-size-dependent scale is >= 2x off)
    assert doubled.item() == pytest.approx(single.item(), rel=1e-5)


def test_shape_errors():
    lx, ly, tx, ty = _random_case()
    with pytest.raises(ValueError, match="target_weight"):
        simcc_kl_loss(lx, ly, tx, ty, torch.ones(3))
    with pytest.raises(ValueError, match="differ"):
        simcc_kl_loss(lx, ly, tx[..., :-1], ty, torch.ones(3, 4))
