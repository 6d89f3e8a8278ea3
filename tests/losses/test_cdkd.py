"""CDKD losses (Gu et al., Eqs. 5-12) against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from kdray.losses.cdkd import (bin_overlap_matrix, cca_logit_loss, cca_merge, cdkd_total_loss,
                               cosine_feature_loss, tau_kl)
from kdray.losses.etht import (GradientReversal, LearnableTemperature, grad_reverse,
                               learnable_loss_weight, reversal_schedule)

P8 = [0.05, 0.15, 0.10, 0.20, 0.05, 0.25, 0.12, 0.08]  # sums to 1.00


# ---- Eq. (5) ---------------------------------------------------------------------------------
def test_cosine_feature_loss_identical_orthogonal_opposite():
    x = torch.randn(3, 4, 2, 2)
    # fp32: cos of 16-term dot products is a few u (6e-8) from +-1; abs=1e-6, a wrong loss is >= 0.5
    assert cosine_feature_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_feature_loss(5.0 * x, x).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert cosine_feature_loss(-x, x).item() == pytest.approx(2.0, abs=1e-6)
    a = torch.zeros(1, 2, 1, 1); a[0, 0] = 1.0
    b = torch.zeros(1, 2, 1, 1); b[0, 1] = 1.0
    assert cosine_feature_loss(a, b).item() == pytest.approx(1.0, abs=1e-6)
    # batch mean: sample 0 identical (0), sample 1 orthogonal (1) -> (0 + 1) / 2
    assert cosine_feature_loss(torch.cat([a, a]), torch.cat([a, b])).item() == pytest.approx(0.5)


# ---- Eq. (6) ---------------------------------------------------------------------------------
def test_cca_merge_integer_ratio_sums_pairs():
    p = torch.tensor(P8).view(1, 1, 8)
    merged = cca_merge(p, bin_overlap_matrix(8, 4))
    # m = 8 / 4 = 2: [0.05+0.15, 0.10+0.20, 0.05+0.25, 0.12+0.08]
    torch.testing.assert_close(merged, torch.tensor([[[0.20, 0.30, 0.30, 0.20]]]))
    assert merged.sum().item() == pytest.approx(1.0)


def test_cca_merge_fractional_ratio():
    # 8 -> 3: each teacher bin is 3/8 of a student bin. On the teacher axis the student bins are
    # [0, 8/3), [8/3, 16/3), [16/3, 8): bin 2 = [2, 3) splits 2/3 | 1/3, bin 5 = [5, 6) 1/3 | 2/3.
    p = torch.tensor(P8).view(1, 1, 8)
    expected = [
        0.05 + 0.15 + (2 / 3) * 0.10,                    # = 0.2666...
        (1 / 3) * 0.10 + 0.20 + 0.05 + (1 / 3) * 0.25,   # = 0.3666...
        (2 / 3) * 0.25 + 0.12 + 0.08,                    # = 0.3666...
    ]
    assert expected == pytest.approx([0.26666667, 0.36666667, 0.36666667])
    merged = cca_merge(p, bin_overlap_matrix(8, 3))
    torch.testing.assert_close(merged, torch.tensor([[expected]]))
    assert merged.sum().item() == pytest.approx(1.0)


def test_overlap_matrix_rows_and_entries():
    m = bin_overlap_matrix(8, 3)
    assert m.shape == (8, 3)
    torch.testing.assert_close(m.sum(dim=1), torch.ones(8))
    torch.testing.assert_close(m[2], torch.tensor([2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(m[5], torch.tensor([0.0, 1 / 3, 2 / 3]))
    torch.testing.assert_close(m[0], torch.tensor([1.0, 0.0, 0.0]))
    # integer ratio 4: exactly Eq. (6), teacher bin i -> student bin i // 4
    m4 = bin_overlap_matrix(96, 24)
    torch.testing.assert_close(m4, torch.eye(24).repeat_interleave(4, dim=0))
    for t, s in [(384, 96), (96, 64), (7, 7), (5, 11)]:
        torch.testing.assert_close(bin_overlap_matrix(t, s).sum(dim=1), torch.ones(t))
    # sums are kept per joint on a random batch
    p = torch.rand(2, 3, 96).softmax(-1)
    torch.testing.assert_close(cca_merge(p, bin_overlap_matrix(96, 40)).sum(-1), torch.ones(2, 3))


# ---- Eq. (7) ---------------------------------------------------------------------------------
def test_tau_kl_by_hand():
    # scale = 1, tau = 2. Student logits [0, 0] -> p_s = [1/2, 1/2];
    # [2 ln 3, 0] / 2 = [ln 3, 0] -> p_s = [3/4, 1/4]. Teacher (merged) p_t = [3/4, 1/4] everywhere.
    z0, z1 = [0.0, 0.0], [2 * math.log(3.0), 0.0]
    student = torch.tensor([[z0, z1], [z1, z0]])                        # (B=2, K=2, 2)
    teacher = torch.tensor([[0.75, 0.25]]).expand(2, 2, 2)
    a = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)       # KL([3/4,1/4]||[1/2,1/2])
    assert a == pytest.approx(0.130812, abs=1e-6)
    # sample 0: a + 0, sample 1: 0 + a; mean over batch = a; times tau^2 = 4
    got = tau_kl(student, teacher, tau=2.0, scale=1.0)
    assert got.item() == pytest.approx(4 * a, rel=1e-5)                 # = 0.523248
    # weight masks joint 0 of sample 0: sums are 0 and a, mean a / 2, times 4
    w = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert tau_kl(student, teacher, 2.0, 1.0, w).item() == pytest.approx(2 * a, rel=1e-5)
    # identical distributions -> 0; an empty teacher bin adds 0 (and no NaN)
    assert tau_kl(torch.zeros(1, 1, 2), torch.full((1, 1, 2), 0.5), 3.0, 1.0).item() == 0.0
    one_hot = torch.tensor([[[1.0, 0.0]]])
    assert tau_kl(torch.zeros(1, 1, 2), one_hot, 1.0, 1.0).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_cca_logit_loss_by_hand(scale):
    tau = 2.0
    c = tau / scale  # logits c * ln(q) -> softmax(scale * logits / tau) = q / sum(q)
    # x: teacher 4 bins -> [.1,.2,.3,.4] -> merged (m = 2) [.3,.7]; student [0,0] -> [.5,.5]
    tx = c * torch.log(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]))
    sx = torch.zeros(1, 1, 2)
    kl_x = 0.3 * math.log(0.3 / 0.5) + 0.7 * math.log(0.7 / 0.5)
    # y: teacher 6 equal bins -> merged thirds; student ln[1,1,2] -> [.25,.25,.5]
    ty = torch.zeros(1, 1, 6)
    sy = c * torch.log(torch.tensor([[[1.0, 1.0, 2.0]]]))
    kl_y = 2 * (1 / 3) * math.log((1 / 3) / 0.25) + (1 / 3) * math.log((1 / 3) / 0.5)
    got = cca_logit_loss(sx, sy, tx, ty, tau=tau, weight=None, scale=scale)
    assert got.item() == pytest.approx(tau**2 * (kl_x + kl_y), rel=1e-5)


# ---- Eq. (8) ---------------------------------------------------------------------------------
def test_total_loss():
    got = cdkd_total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), 0.5, 2.0)
    assert got.item() == pytest.approx(1.0 + 0.5 * 2.0 + 2.0 * 3.0)


# ---- ETHT, Eqs. (9)-(12) ---------------------------------------------------------------------
def test_gradient_reversal_function():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = grad_reverse(x, 0.3)
    torch.testing.assert_close(y, x.detach())
    (y * torch.tensor([2.0, 5.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.6, -1.5]))
    x.grad = None       # the Function itself, another xi: upstream 1 -> -xi
    GradientReversal.apply(x, 2.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-2.0, -2.0]))


def _fixed_pair():
    g = torch.Generator().manual_seed(0)
    sx, sy = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 6, generator=g)
    tx, ty = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 12, generator=g)
    return sx, sy, tx, ty


def _theta_grad(lt, strength):
    lt.zero_grad()
    tau = lt.value if strength is None else lt(strength)
    cca_logit_loss(*_fixed_pair(), tau=tau, weight=None, scale=1.0).backward()
    return lt.theta.grad.clone()


def test_learnable_temperature_range_and_init():
    lt = LearnableTemperature(init=4.0, lo=1.0, hi=10.0)
    # fp32: 1 + 9 sigmoid(fp32 log 0.5): ~2 ulp of sigmoid (3e-8 each) x 9 -> <= 2e-7 relative
    assert lt.value.item() == pytest.approx(4.0, rel=1e-6)
    with torch.no_grad():
        lt.theta.fill_(50.0)
    assert 1.0 <= lt.value.item() <= 10.0
    w = learnable_loss_weight(1.5)
    assert (w.lo, w.hi) == (0.0, 3.0) and w.value.item() == pytest.approx(1.5)
    assert w.theta.item() == pytest.approx(0.0)
    with pytest.raises(ValueError):
        LearnableTemperature(init=12.0, lo=1.0, hi=10.0)


def test_etht_reverses_and_scales_by_xi():
    lt = LearnableTemperature(init=4.0)
    plain = _theta_grad(lt, None)
    # plain = dL/dtau * dtau/dtheta, dtau/dtheta = 9 sigmoid (1 - sigmoid) = 9 (1/3)(2/3) = 2 at
    # tau = 4; dL/dtau by a float64 central difference (h = 1e-4: truncation ~ h^2, tiny)
    def loss(tau):
        return cca_logit_loss(*(z.double() for z in _fixed_pair()), tau=tau, weight=None,
                              scale=1.0).item()
    fd = (loss(4.0 + 1e-4) - loss(4.0 - 1e-4)) / 2e-4
    # fp32 autograd: the gradient (~0.01) is ~1% of the loss' terms, so fp32's 1e-7 of those is
    # ~1e-5 of it (measured 1.2e-5)
    assert plain.item() == pytest.approx(2.0 * fd, rel=1e-4)
    for strength in (0.25, 1.0):   # exactly -strength times the plain gradient on theta
        torch.testing.assert_close(_theta_grad(lt, strength), -strength * plain)
    assert _theta_grad(lt, 0.0).item() == 0.0

    pair64 = [t.double() for t in _fixed_pair()]

    def loss_at(m):
        with torch.no_grad():
            return cca_logit_loss(*pair64, tau=m.value, scale=1.0).item()

    # one SGD step with the reversed gradient moves tau so the distillation loss INCREASES,
    # and the theta step is proportional to strength. In float64: in float32, theta (~-0.69, ulp 6e-8)
    # minus a step of ~1e-4 rounds the step to ~2.4e-4 relative, which depends on the CPU's
    # exp/log kernels (AVX2 gave 0.24997). In float64 the rounding is ~1e-12 relative; the
    # gradient ratio is exact (strength = 0.25 is a power of two), so rel=1e-9 is ample and still
    # rejects any other scaling (strength**2 -> 0.0625, a missing strength -> 1.0).
    steps = {}
    for strength in (0.25, 1.0):
        m = LearnableTemperature(init=4.0).double()
        before, theta0 = loss_at(m), m.theta.item()
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        opt.zero_grad()
        cca_logit_loss(*pair64, tau=m(strength), scale=1.0).backward()
        opt.step()
        assert loss_at(m) > before
        steps[strength] = m.theta.item() - theta0
    assert steps[0.25] / steps[1.0] == pytest.approx(0.25, rel=1e-9)


def test_reversal_schedule():
    # cosine: strength_max * 0.5 (1 - cos(pi t/T)) at t = 0, T/4, T/2, T
    assert reversal_schedule(0.0, 2.0, "cosine") == pytest.approx(0.0)
    assert reversal_schedule(0.25, 2.0, "cosine") == pytest.approx(2.0 * 0.5 * (1 - math.sqrt(0.5)))
    assert reversal_schedule(0.5, 2.0, "cosine") == pytest.approx(1.0)
    assert reversal_schedule(1.0, 2.0, "cosine") == pytest.approx(2.0)
    # ctkd: the same ramp over the first 10 of 200 epochs, then flat at strength_max
    assert reversal_schedule(0.0, 1.0, "ctkd", total_epochs=200) == pytest.approx(0.0)
    assert reversal_schedule(5 / 200, 1.0, "ctkd", total_epochs=200) == pytest.approx(0.5)
    assert reversal_schedule(10 / 200, 1.0, "ctkd", total_epochs=200) == pytest.approx(1.0)
    assert reversal_schedule(0.5, 1.0, "ctkd", total_epochs=200) == pytest.approx(1.0)
    assert reversal_schedule(1.0, 1.0, "ctkd", total_epochs=200) == pytest.approx(1.0)
    ts = [i / 50 for i in range(51)]
    for kind in ("cosine", "ctkd"):
        vals = [reversal_schedule(t, 1.0, kind, total_epochs=200) for t in ts]
        assert all(b >= a for a, b in zip(vals, vals[1:]))               # monotone (Eq. 12)
    with pytest.raises(ValueError):
        reversal_schedule(0.5, 1.0, "ctkd")
    with pytest.raises(ValueError):
        reversal_schedule(0.5, 1.0, "linear")
