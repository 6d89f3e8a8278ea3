"""ETHT, CDKD Eqs. (9)-(12), after CTKD: a curriculum temperature learnt by gradient reversal.

- `GradientReversal` / `grad_reverse`, Eq. (11): identity forward, gradient times -strength
  backward (the paper's xi; kdray says "reversal strength" because TSD's xi is a loss weight).
- `reversal_schedule`, Eq. (12): the reversal strength xi(t), rising with training progress.
- `LearnableTemperature`, Sec. III-B2: tau (or a loss weight, `learnable_loss_weight`) kept in
  (lo, hi) by a sigmoid, read through `grad_reverse`, so the optimiser that minimises the
  student's loss maximises it with respect to tau.

kdray/losses/cdkd.py holds the losses tau enters (CCA and the tau^2 KL).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class GradientReversal(torch.autograd.Function):
    """ETHT, Eq. (11): identity forward; backward multiplies the gradient by -strength.

    A descent step on what sits behind it is then an ascent step on strength * L (Eq. 10/11)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:  # type: ignore[override]
        ctx.strength = float(strength)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.strength * grad, None


def grad_reverse(x: torch.Tensor, strength: float) -> torch.Tensor:
    """x unchanged; its gradient times -strength on the way back (CDKD Eq. 11)."""
    return GradientReversal.apply(x, strength)


def reversal_schedule(progress: float, strength_max: float = 1.0, kind: str = "cosine",
                total_epochs: int | None = None, ramp_epochs: int = 10) -> float:
    """xi(t), Eq. (12), monotone increasing in the training progress t/T = progress in [0, 1].

    cosine: strength_max * 0.5 (1 - cos(pi t / T)) over the whole run (0 -> strength_max).
    ctkd: CTKD's official schedule (its default `--cosine_decay 1 --decay_loops 10`): the same
      half-cosine ramp but over the first `ramp_epochs` epochs, strength_max afterwards; needs
      total_epochs to turn progress into an epoch count.
    """
    t = min(max(float(progress), 0.0), 1.0)
    if kind == "cosine":
        return strength_max * 0.5 * (1.0 - math.cos(math.pi * t))
    if kind == "ctkd":
        if not total_epochs or total_epochs <= 0:
            raise ValueError("reversal_schedule(kind='ctkd') needs total_epochs > 0")
        ramp = min(t * total_epochs / ramp_epochs, 1.0)
        return strength_max * 0.5 * (1.0 - math.cos(math.pi * ramp))
    raise ValueError(f"unknown reversal schedule {kind!r} (choose 'cosine' or 'ctkd')")


class LearnableTemperature(nn.Module):
    """ETHT hyper-parameter (Sec. III-B2): value = lo + (hi - lo) * sigmoid(theta), in (lo, hi).

    theta starts where value == init. forward(strength) returns the value behind `grad_reverse`, so the
    optimizer that minimises the student's loss maximises strength * L w.r.t. theta (Eq. 11). Default
    range (1, 10) for tau (docs/methods.md 3.6; CTKD's own is (1, 21)). For learnable loss weights
    (Table VIII) use `learnable_loss_weight`: range (0, 2 * init), which starts at sigmoid(0).
    """

    def __init__(self, init: float = 4.0, lo: float = 1.0, hi: float = 10.0) -> None:
        super().__init__()
        if not lo < init < hi:
            raise ValueError(f"need lo < init < hi, got lo={lo}, init={init}, hi={hi}")
        self.lo, self.hi = float(lo), float(hi)
        u = (init - lo) / (hi - lo)
        self.theta = nn.Parameter(torch.tensor(math.log(u / (1.0 - u))))

    @property
    def value(self) -> torch.Tensor:
        """The current value (0-dim), without reversal: for logging and plain use."""
        return self.lo + (self.hi - self.lo) * torch.sigmoid(self.theta)

    def forward(self, strength: float) -> torch.Tensor:
        return grad_reverse(self.value, strength)

    def extra_repr(self) -> str:
        return f"lo={self.lo}, hi={self.hi}, value={float(self.value):.4f}"


def learnable_loss_weight(init: float) -> LearnableTemperature:
    """ETHT on alpha or beta of Eq. (8) (Table VIII): range (0, 2 * init), starting at init.

    The reversal pushes a loss weight up (L_fea, L_logit >= 0), so the upper bound matters."""
    if init <= 0:
        raise ValueError(f"a learnable loss weight needs init > 0, got {init}")
    return LearnableTemperature(init=init, lo=0.0, hi=2.0 * init)
