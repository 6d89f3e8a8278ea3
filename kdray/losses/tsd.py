"""TSD losses (Ji et al., two-stage distillation), Eqs. (1)-(7); docs/methods.md section 2.

Every function takes named tensors and plain numbers, never a config object, so a task composes
them at the call site. Conventions shared by all of them:

- Joint coordinates ``*_xy`` are (B, K, 2) = (x, y) normalised to [0, 1] by the input width and
  height (soft-argmax expectations for the networks, see ``kdray.codecs.simcc``), so every loss
  is scale-free.
- ``mask`` is (B, K); a joint is labelled where ``mask > 0`` (the paper's binary M). Float
  weights are binarised on purpose: Eq. (6) defines M in Z_2^K.
- The target side (teacher output or GT) is detached: it is a constant of the student's loss,
  even if a caller forgets ``torch.no_grad()`` around the frozen teacher.
- Empty masks give 0 (still attached to the graph), never NaN.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Added under the square root of an edge length: keeps the gradient finite when both joints of
# an edge coincide (all soft-argmax joints start at the crop centre from uniform logits).
_LENGTH_EPS = 1e-12


# ---- Stage 1 -------------------------------------------------------------------------------

def make_feature_adapter(cs: int, ct: int) -> nn.Conv2d:
    """The 1x1 convolution ``cov_1x1`` of TSD Eq. (1): student channels Cs -> teacher Ct."""
    return nn.Conv2d(cs, ct, kernel_size=1)


def feature_mse(student_feat: Tensor, teacher_feat: Tensor, adapter: nn.Module) -> Tensor:
    """L_fea, TSD Eq. (1): (1/CHW) sum (F_tea - conv1x1(F_stu))^2, averaged over the batch.

    student_feat (B, Cs, Hs, Ws), teacher_feat (B, Ct, Ht, Wt), adapter maps Cs -> Ct.
    C, H, W are the teacher's; when (Hs, Ws) != (Ht, Wt) the adapted student map is resized
    bilinearly (align_corners=False) to the teacher's size (decision, docs/methods.md 4). With equal
    C*H*W per sample, "normalise by CHW then average over B" is the mean over all elements.
    Returns a scalar.
    """
    adapted = adapter(student_feat)
    if adapted.shape[1] != teacher_feat.shape[1]:
        raise ValueError(f"adapter gives {adapted.shape[1]} channels, teacher has "
                         f"{teacher_feat.shape[1]}")
    if adapted.shape[-2:] != teacher_feat.shape[-2:]:
        adapted = F.interpolate(adapted, size=teacher_feat.shape[-2:], mode="bilinear",
                                align_corners=False)
    return F.mse_loss(adapted, teacher_feat.detach(), reduction="mean")


def _masked_l1(pred_xy: Tensor, target_xy: Tensor, mask: Tensor) -> Tensor:
    """sum over labelled joints of |dx| + |dy|, divided by the number of labelled joints.

    pred_xy, target_xy (B, K, 2); mask (B, K). The count is over the whole batch, so every
    labelled joint weighs the same whatever its sample (mmpose's KL/L1 losses do likewise).
    """
    m = (mask > 0).to(pred_xy.dtype)                                      # (B, K)
    per_joint = (pred_xy - target_xy.detach()).abs().sum(dim=-1)          # (B, K): |dx|+|dy|
    return (per_joint * m).sum() / m.sum().clamp(min=1.0)


def pose_l1(student_xy: Tensor, teacher_xy: Tensor, mask: Tensor) -> Tensor:
    """First term of L_pos, TSD Eq. (2): (1/N) sum_n |P_tea - P_stu| over labelled joints.

    student_xy, teacher_xy (B, K, 2) normalised; mask (B, K). Normalisation (decision): the
    per-joint L1 distance |dx| + |dy|, summed over joints with a GT label and divided by the
    number of such joints in the batch. Returns a scalar.
    """
    return _masked_l1(student_xy, teacher_xy, mask)


def skeleton_edges(skeleton: Sequence[tuple[int, int]], device=None) -> Tensor:
    """KeypointSpec.skeleton -> LongTensor (E, 2) of 0-based joint index pairs."""
    return torch.as_tensor(list(skeleton), dtype=torch.long, device=device).reshape(-1, 2)


def _edge_lengths(xy: Tensor, edges: Tensor) -> Tensor:
    """Euclidean edge lengths: xy (..., K, 2), edges (E, 2) -> (..., E)."""
    d = xy[..., edges[:, 0], :] - xy[..., edges[:, 1], :]
    return (d.pow(2).sum(dim=-1) + _LENGTH_EPS).sqrt()


def structure_loss(student_xy: Tensor, teacher_xy: Tensor, edges: Tensor, edge_weights: Tensor,
                   mask: Tensor) -> Tensor:
    """L_cst, TSD Eq. (3): sum_(i,j) w_ij |e_ij(tea) - e_ij(stu)|, averaged over the batch.

    student_xy, teacher_xy (B, K, 2) normalised; edges (E, 2) long; edge_weights (E,); mask
    (B, K). An edge counts only when both its joints are labelled; the weights are NOT
    renormalised over the edges that count (a sample missing an edge simply loses that term),
    and the per-sample sums are divided by B. Returns a scalar.
    """
    edges = edges.to(student_xy.device)
    labelled = mask > 0
    valid = (labelled[:, edges[:, 0]] & labelled[:, edges[:, 1]]).to(student_xy.dtype)  # (B, E)
    diff = (_edge_lengths(teacher_xy.detach(), edges) - _edge_lengths(student_xy, edges)).abs()
    w = edge_weights.to(student_xy)                                                    # (E,)
    return (diff * valid * w).sum() / max(student_xy.shape[0], 1)


def mean_edge_lengths(keypoints, skeleton: Sequence[tuple[int, int]]) -> Tensor:
    """Mean GT length of each skeleton edge over a training set (for inverse_length weights).

    keypoints (N, K, 3) = (x, y, v) with x, y normalised like the losses' coordinates and v the
    COCO visibility; a pair counts when both v > 0. An edge never labelled in the set gets the
    mean of the other edges' lengths (so its weight is average, not infinite). Returns (E,)
    float32.
    """
    kp = torch.as_tensor(keypoints, dtype=torch.float64)
    edges = skeleton_edges(skeleton)
    labelled = kp[..., 2] > 0                                                   # (N, K)
    valid = (labelled[:, edges[:, 0]] & labelled[:, edges[:, 1]]).double()      # (N, E)
    lengths = (kp[:, edges[:, 0], :2] - kp[:, edges[:, 1], :2]).norm(dim=-1)    # (N, E)
    count = valid.sum(dim=0)
    if not bool((count > 0).any()):
        raise ValueError("no skeleton edge has both joints labelled in the given keypoints")
    mean = (lengths * valid).sum(dim=0) / count.clamp(min=1.0)
    mean[count == 0] = mean[count > 0].mean()
    return mean.float()


def edge_weights(skeleton: Sequence[tuple[int, int]], mode: str = "uniform",
                 mean_lengths: Tensor | None = None) -> Tensor:
    """Edge weights w_ij of TSD Eq. (3), (E,) float32 summing to 1 (decision, docs/methods.md 4).

    ``uniform``: 1/|E|. ``inverse_length``: proportional to 1 / mean GT edge length (from
    ``mean_edge_lengths``), the anatomical-constraint variant: short limbs (eyes, ears) are not
    drowned by long ones.
    """
    num_edges = len(skeleton)
    if num_edges == 0:
        raise ValueError("the skeleton has no edges")
    if mode == "uniform":
        return torch.full((num_edges,), 1.0 / num_edges)
    if mode == "inverse_length":
        if mean_lengths is None:
            raise ValueError("edge_weights mode 'inverse_length' needs mean_lengths")
        lengths = torch.as_tensor(mean_lengths, dtype=torch.float64).reshape(-1)
        if lengths.numel() != num_edges:
            raise ValueError(f"{lengths.numel()} mean lengths for {num_edges} edges")
        inv = 1.0 / lengths.clamp(min=1e-6)
        return (inv / inv.sum()).float()
    raise ValueError(f"unknown edge_weights mode {mode!r} (uniform | inverse_length)")


def gamma(epoch_1based: int, total_epochs: int) -> float:
    """gamma(t), TSD Eq. (4): 1 - (t - 1)/T, t the 1-based epoch in 1..T (1 at t=1, 1/T at t=T)."""
    if total_epochs < 1 or not 1 <= epoch_1based <= total_epochs:
        raise ValueError(f"gamma needs 1 <= t <= T, got t={epoch_1based}, T={total_epochs}")
    return 1.0 - (epoch_1based - 1) / total_epochs


def stage1_loss(l_kl: Tensor, l_fea: Tensor, l_pos: Tensor, gamma_t: float, alpha: float,
                beta: float) -> Tensor:
    """L_s1, TSD Eq. (5): L_KL + gamma(t) alpha L_fea + gamma(t) beta L_pos.

    l_pos is Eq. (2) whole: ``pose_l1 + structure_loss`` (L_cst sits inside L_pos, so beta
    scales both). Table IV rows that drop a term pass a zero for it.
    """
    return l_kl + gamma_t * alpha * l_fea + gamma_t * beta * l_pos


# ---- Stage 2 -------------------------------------------------------------------------------

def gcn_block_loss(pred_xy: Tensor, target_xy: Tensor, mask: Tensor) -> Tensor:
    """L_i^GCN, TSD Eq. (6): (1/N) sum_n |(P_tea - P_i) * M|.

    pred_xy (B, K, 2) the output P_i of GCN block i, target_xy (B, K, 2) the teacher's pose (or
    the GT for Table IV row s1), both normalised; mask (B, K) the GT-label mask M. Same
    normalisation as ``pose_l1``: |dx| + |dy| summed over labelled joints, divided by their
    number in the batch. Returns a scalar.
    """
    return _masked_l1(pred_xy, target_xy, mask)


def stage2_loss(block_losses: Sequence[Tensor],
                weights: Sequence[float] = (0.3, 0.5, 1.0)) -> Tensor:
    """L_s2, TSD Eq. (7): delta L_1 + lambda L_2 + xi L_3 (paper: 0.3, 0.5, 1.0)."""
    if len(block_losses) != len(weights):
        raise ValueError(f"{len(block_losses)} block losses for {len(weights)} weights")
    return sum(w * loss for w, loss in zip(weights, block_losses))
