"""CDKD losses (Gu et al.): cosine feature loss, cross-class alignment, ETHT temperature.

- L_fea, Eq. (5): `cosine_feature_loss` on SAPE's output (`kdray.nn.sape.SAPE`).
- CCA, Eq. (6): the teacher's SimCC distribution (Tb bins per axis) is merged onto the student's
  coarser axis (Sb bins) with `bin_overlap_matrix` / `cca_merge`.
- L_logit, Eq. (7): `tau_kl` / `cca_logit_loss`, tau^2 KL(p_t_merged || p_s(tau)).
- L_total, Eq. (8): `cdkd_total_loss`.
- ETHT, Eqs. (9)-(12): kdray/losses/etht.py (the learnt temperature). NECM (Table III) is the
  same loss with a plain float tau.

Temperature (docs/methods.md section 3.4): both sides use the task loss' scaled logits,
p = softmax(scale * logits / tau) with scale = 10, and the teacher is softened *before*
merging, because Eq. (6) sums probabilities, and the probabilities to distil are the softened ones
(as in KD, where tau acts on both sides). The gradient w.r.t. tau flows through both sides.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from kdray.codecs.simcc import SOFTMAX_SCALE

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
           scale: float = SOFTMAX_SCALE, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (7) for one axis: sum over joints of tau^2 KL(p_t || softmax(scale * z_s / tau)).

    student_logits (B, K, Sb); teacher_merged_probs (B, K, Sb), already softened and merged;
    tau a float (NECM) or a 0-dim tensor (ETHT); weight (B, K) multiplies each joint's KL
    (0 masks it), None = all joints. Reduction: sum over joints (as Eq. 7 writes it), mean over
    the batch, so the scale grows with K (beta in Eq. 8 absorbs that).
    """
    log_ps = F.log_softmax(scale * student_logits / tau, dim=-1)
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
                   weight: torch.Tensor | None = None, scale: float = SOFTMAX_SCALE) -> torch.Tensor:
    """L_logit, Eqs. (6)-(7), summed over the x and y axes.

    student_lx (B, K, Wx_s), student_ly (B, K, Hy_s); teacher_lx (B, K, Wx_t), teacher_ly
    (B, K, Hy_t). The teacher is softened with the same tau, then merged onto the student bins.
    Teacher logits are detached: the teacher is a fixed target (tau still gets its gradient).
    """
    total = student_lx.new_zeros(())
    for zs, zt in ((student_lx, teacher_lx), (student_ly, teacher_ly)):
        pt = F.softmax(scale * zt.detach() / tau, dim=-1)
        merged = cca_merge(pt, _overlap_on(zt.shape[-1], zs.shape[-1], pt.device, pt.dtype))
        total = total + tau_kl(zs, merged, tau, scale=scale, weight=weight)
    return total


def cdkd_total_loss(l_ori: torch.Tensor, l_fea: torch.Tensor, l_logit: torch.Tensor,
                    alpha: Scalar, beta: Scalar) -> torch.Tensor:
    """Eq. (8): L_total = L_ori + alpha L_fea + beta L_logit (alpha, beta floats or ETHT tensors)."""
    return l_ori + alpha * l_fea + beta * l_logit
