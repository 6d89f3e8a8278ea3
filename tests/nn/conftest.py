"""A gradient check shared by the network tests: autograd against finite differences."""
from __future__ import annotations

import pytest
import torch


def assert_gradients_match_finite_differences(loss_fn, tensors: dict[str, torch.Tensor],
                                              h: float = 1e-6) -> None:
    """For every tensor (float64, requires_grad): the gradient of ``loss_fn()`` is non-zero and
    its projection on a random direction d equals the central difference
    (L(x + h d) - L(x - h d)) / 2h. In float64 the difference's truncation error is ~h^2 and
    its rounding ~1e-16 L / h ~1e-10, so rel 1e-6 / abs 1e-8 separate a correct gradient from a
    wrong or missing one (a gradient that is merely present is not checked by this)."""
    for t in tensors.values():
        t.grad = None
    loss_fn().backward()
    g = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, f"no gradient reaches {name}"
        d = torch.randn(t.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            t += h * d
            up = loss_fn().item()
            t -= 2 * h * d
            down = loss_fn().item()
            t += h * d
        assert (t.grad * d).sum().item() == pytest.approx((up - down) / (2 * h), rel=1e-6,
                                                          abs=1e-8), name
