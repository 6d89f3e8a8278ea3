"""CDKD losses (Gu et al.): cosine feature loss, cross-class alignment, ETHT temperature.

- L_fea, Eq. (5): `cosine_feature_loss` on SAPE's output (`kdray.nn.sape.SAPE`).
- CCA, Eq. (6): the teacher's SimCC distribution (Tb bins per axis) is merged onto the student's
  coarser axis (Sb bins) with `bin_overlap_matrix` / `cca_merge`.
- L_logit, Eq. (7): `tau_kl` / `cca_logit_loss`, tau^2 KL(p_t_merged || p_s(tau)).
- L_total, Eq. (8): `cdkd_total_loss`.
- ETHT, Eqs. (9)-(12), after CTKD: `LearnableTemperature` behind `grad_reverse`, scaled by
  `xi_schedule`. NECM (Table III) is the same loss with a plain float tau.

Temperature (docs/methods.md section 3.4): both sides use the task loss' scaled logits,
p = softmax(beta_scale * logits / tau) with beta_scale = 10, and the teacher is softened *before*
merging, because Eq. (6) sums probabilities, and the probabilities to distil are the softened ones
(as in KD, where tau acts on both sides). The gradient w.r.t. tau flows through both sides.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

Scalar = float | torch.Tensor


def cosine_feature_loss(f_out: torch.Tensor, f_teacher: torch.Tensor) -> torch.Tensor:
    """Eq. (5): 1 - cos(F_out, F_t), each sample flattened over C*H*W; mean over the batch.

    f_out, f_teacher: (B, C, H, W) -> scalar in [0, 2]."""
    cos = F.cosine_similarity(f_out.flatten(1), f_teacher.flatten(1), dim=1, eps=1e-8)
    return (1.0 - cos).mean()


def bin_overlap_matrix(teacher_bins: int, student_bins: int) -> torch.Tensor:
    """CCA merge matrix (Tb, Sb), float32; Eq. (6) generalised to any bin ratio.

    Teacher bin i covers [i, i+1) on its axis, i.e. [i*Sb/Tb, (i+1)*Sb/Tb) on the student axis;
    entry [i, j] is the fraction of it inside student bin [j, j+1). Rows sum to 1. When
    Tb / Sb = m is an integer this is Eq. (6): student bin j receives teacher bins j*m..j*m+m-1.
    Computed in integer units of 1/(Tb) student bins, so the fractions are exact.
    """
    if teacher_bins < 1 or student_bins < 1:
        raise ValueError(f"bin counts must be >= 1, got {teacher_bins}, {student_bins}")
    i = torch.arange(teacher_bins, dtype=torch.float64)[:, None]
    j = torch.arange(student_bins, dtype=torch.float64)[None, :]
    # teacher bin i = [i*Sb, (i+1)*Sb), student bin j = [j*Tb, (j+1)*Tb), both in units of 1/Tb
    lo = torch.maximum(i * student_bins, j * teacher_bins)
    hi = torch.minimum((i + 1) * student_bins, (j + 1) * teacher_bins)
    return ((hi - lo).clamp(min=0) / student_bins).float()


@lru_cache(maxsize=32)
def _overlap_on(teacher_bins: int, student_bins: int, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """bin_overlap_matrix built once per (sizes, device, dtype): no host copy every step."""
    return bin_overlap_matrix(teacher_bins, student_bins).to(device=device, dtype=dtype)


def cca_merge(teacher_probs: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """Eq. (6): teacher_probs (B, K, Tb) @ overlap (Tb, Sb) -> (B, K, Sb); each sum is kept."""
    return teacher_probs @ overlap.to(device=teacher_probs.device, dtype=teacher_probs.dtype)


def tau_kl(student_logits: torch.Tensor, teacher_merged_probs: torch.Tensor, tau: Scalar,
           beta_scale: float = 10.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (7) for one axis: sum over joints of tau^2 KL(p_t || softmax(beta_scale * z_s / tau)).

    student_logits (B, K, Sb); teacher_merged_probs (B, K, Sb), already softened and merged;
    tau a float (NECM) or a 0-dim tensor (ETHT); weight (B, K) multiplies each joint's KL
    (0 masks it), None = all joints. Reduction: sum over joints (as Eq. 7 writes it), mean over
    the batch, so the scale grows with K (beta in Eq. 8 absorbs that).
    """
    log_ps = F.log_softmax(beta_scale * student_logits / tau, dim=-1)
    pt = teacher_merged_probs
    # Clamp inside the log only: an empty teacher bin adds 0 * finite = 0 and a finite gradient
    # (xlogy's gradient is 0/0 = NaN there, and under ETHT pt depends on tau).
    log_pt = pt.clamp_min(torch.finfo(pt.dtype).tiny).log()
    kl = (pt * (log_pt - log_ps)).sum(dim=-1)                            # (B, K)
    if weight is not None:
        kl = kl * weight
    return (tau ** 2) * kl.sum(dim=1).mean()


def cca_logit_loss(student_lx: torch.Tensor, student_ly: torch.Tensor,
                   teacher_lx: torch.Tensor, teacher_ly: torch.Tensor, tau: Scalar,
                   weight: torch.Tensor | None = None, beta_scale: float = 10.0) -> torch.Tensor:
    """L_logit, Eqs. (6)-(7), summed over the x and y axes.

    student_lx (B, K, Wx_s), student_ly (B, K, Hy_s); teacher_lx (B, K, Wx_t), teacher_ly
    (B, K, Hy_t). The teacher is softened with the same tau, then merged onto the student bins.
    Teacher logits are detached: the teacher is a fixed target (tau still gets its gradient).
    """
    total = student_lx.new_zeros(())
    for zs, zt in ((student_lx, teacher_lx), (student_ly, teacher_ly)):
        pt = F.softmax(beta_scale * zt.detach() / tau, dim=-1)
        merged = cca_merge(pt, _overlap_on(zt.shape[-1], zs.shape[-1], pt.device, pt.dtype))
        total = total + tau_kl(zs, merged, tau, beta_scale=beta_scale, weight=weight)
    return total


def cdkd_total_loss(l_ori: torch.Tensor, l_fea: torch.Tensor, l_logit: torch.Tensor,
                    alpha: Scalar, beta: Scalar) -> torch.Tensor:
    """Eq. (8): L_total = L_ori + alpha L_fea + beta L_logit (alpha, beta floats or ETHT tensors)."""
    return l_ori + alpha * l_fea + beta * l_logit


class GradientReversal(torch.autograd.Function):
    """ETHT, Eq. (11): identity forward; backward multiplies the gradient by -xi.

    A descent step on what sits behind it is then an ascent step on xi * L (Eq. 10/11)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, xi: float) -> torch.Tensor:  # type: ignore[override]
        ctx.xi = float(xi)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.xi * grad, None


def grad_reverse(x: torch.Tensor, xi: float) -> torch.Tensor:
    """x unchanged; its gradient times -xi on the way back (CDKD Eq. 11)."""
    return GradientReversal.apply(x, xi)


def xi_schedule(progress: float, xi_max: float = 1.0, kind: str = "cosine",
                total_epochs: int | None = None, ramp_epochs: int = 10) -> float:
    """xi(t), Eq. (12), monotone increasing in the training progress t/T = progress in [0, 1].

    cosine: xi_max * 0.5 (1 - cos(pi t / T)) over the whole run (0 -> xi_max).
    ctkd: CTKD's official schedule (its default `--cosine_decay 1 --decay_loops 10`): the same
      half-cosine ramp but over the first `ramp_epochs` epochs, xi_max afterwards; needs
      total_epochs to turn progress into an epoch count.
    """
    t = min(max(float(progress), 0.0), 1.0)
    if kind == "cosine":
        return xi_max * 0.5 * (1.0 - math.cos(math.pi * t))
    if kind == "ctkd":
        if not total_epochs or total_epochs <= 0:
            raise ValueError("xi_schedule(kind='ctkd') needs total_epochs > 0")
        ramp = min(t * total_epochs / ramp_epochs, 1.0)
        return xi_max * 0.5 * (1.0 - math.cos(math.pi * ramp))
    raise ValueError(f"unknown xi schedule {kind!r} (choose 'cosine' or 'ctkd')")


class LearnableTemperature(nn.Module):
    """ETHT hyper-parameter (Sec. III-B2): value = lo + (hi - lo) * sigmoid(theta), in (lo, hi).

    theta starts where value == init. forward(xi) returns the value behind `grad_reverse`, so the
    optimizer that minimises the student's loss maximises xi * L w.r.t. theta (Eq. 11). Default
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

    def forward(self, xi: float) -> torch.Tensor:
        return grad_reverse(self.value, xi)

    def extra_repr(self) -> str:
        return f"lo={self.lo}, hi={self.hi}, value={float(self.value):.4f}"


def learnable_loss_weight(init: float) -> LearnableTemperature:
    """ETHT on alpha or beta of Eq. (8) (Table VIII): range (0, 2 * init), starting at init.

    The reversal pushes a loss weight up (L_fea, L_logit >= 0), so the upper bound matters."""
    if init <= 0:
        raise ValueError(f"a learnable loss weight needs init > 0, got {init}")
    return LearnableTemperature(init=init, lo=0.0, hi=2.0 * init)
