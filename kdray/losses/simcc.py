"""The SimCC task loss L_KL (docs/methods.md 1.3; SimCC Sec. 3, TSD Eq. 5, CDKD Eq. 8 L_ori).

For every joint k of sample b and each axis, the target is a 1-D Gaussian-smoothed distribution
over the bins (``kdray.codecs.simcc``; it sums to 1) and the prediction is softmax(s * logits), s = SOFTMAX_SCALE = 10
(SimCC's beta):

    KL_bk = sum_i t_i (log t_i - log softmax(s * z)_i),   0 log 0 = 0,
    L_KL  = sum_{b,k} w_bk (KL^x_bk + KL^y_bk) / #{(b, k): w_bk > 0}.

So the loss is the KL of the x and the y distribution of one joint, averaged over the labelled
joints of the batch (weight 0 = unlabelled or outside the crop). Differences from mmpose 1.x's
``KLDiscretLoss(use_target_weight=True)``, on purpose: mmpose takes the *mean* over bins (its
value shrinks by 1/bins, so it depends on the input size and split ratio) and divides the sum
over the batch by K (its value grows with the batch size). Summing over bins gives the true KL;
averaging over labelled joints makes the value independent of batch size, bin count and how
many joints happen to be labelled. With Adam either scaling trains the same; loss weights of the
KD terms (TSD alpha, beta; CDKD alpha, beta) are relative to this scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdray.codecs.simcc import SOFTMAX_SCALE


def simcc_kl_per_joint(logits: Tensor, target: Tensor, scale: float = SOFTMAX_SCALE) -> Tensor:
    """KL(target || softmax(scale * logits)) over the last axis: (B, K, N), (B, K, N) -> (B, K).

    Computed in float32 (logits from bf16 autocast are upcast) with log_softmax, and
    ``xlogy(t, t)`` so that bins where the target is exactly 0 contribute 0, not NaN.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    log_q = F.log_softmax(logits.float() * scale, dim=-1)
    t = target.float()
    return (torch.special.xlogy(t, t) - t * log_q).sum(-1)


def simcc_kl_loss(logits_x: Tensor, logits_y: Tensor, target_x: Tensor, target_y: Tensor,
                  target_weight: Tensor, scale: float = SOFTMAX_SCALE) -> Tensor:
    """L_KL: logits_x / target_x (B, K, Wx), logits_y / target_y (B, K, Hy), target_weight (B, K).

    Returns a scalar: the weighted sum of per-joint KL (x + y) divided by the number of joints
    with weight > 0; 0 (still attached to the graph, never NaN) when no joint is labelled.
    """
    kl = (simcc_kl_per_joint(logits_x, target_x, scale)
          + simcc_kl_per_joint(logits_y, target_y, scale))  # (B, K)
    w = target_weight.float()
    if w.shape != kl.shape:
        raise ValueError(f"target_weight {tuple(w.shape)} must be (B, K) = {tuple(kl.shape)}")
    count = (w > 0).sum().clamp(min=1)
    return (kl * w).sum() / count
