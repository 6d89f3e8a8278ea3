"""SimCC coordinate classification codec (docs/methods.md section 1.2; TSD and CDKD build on it).

Pure functions around a frozen dataclass: no ``nn.Module`` state, so one codec object feeds the
dataset (``encode``) and the evaluator (``decode``, ``flip_logits``), and the losses
(``soft_argmax``, ``normalize_keypoints``).

Bin convention (shared by every module): split ratio k; ``Wx = int(W * k)``, ``Hy = int(H * k)``.
Crop pixel coordinates are OpenCV's (pixel i has its centre at i). Bin b is centred at crop pixel
``b / k``: encoding puts the Gaussian's mean at ``x * k``, decoding is ``argmax / k``.

Flip: mirroring a crop of width W maps pixel x to ``W - 1 - x``, i.e. bin b to ``Wx - k - b``;
plain bin reversal would map it to ``Wx - 1 - b``, which is ``(k - 1) / k`` px (0.5 px at k = 2)
off. :meth:`SimCCCodec.flip_logits` therefore reverses the bin axis and then shifts by ``k - 1``
bins, so flip-test averaging is exact for an equivariant model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["SimCCCodec", "flip_logits", "sigma_for_size", "soft_argmax"]


# SimCC's softmax scale: every softmax over bins is softmax(SOFTMAX_SCALE * logits)
# (docs/methods.md section 1.3). The one definition; losses and tasks use it.
SOFTMAX_SCALE = 10.0


@dataclass(frozen=True)
class SimCCCodec:
    """SimCC targets and decoding for crops of ``input_size = (H, W)``.

    ``sigma`` is the label-smoothing Gaussian's std in bins, one value or ``(sigma_x, sigma_y)``.
    ``softmax_scale`` multiplies logits before every softmax (SimCC's beta, 10).
    """
    input_size: tuple[int, int]
    split_ratio: float = 2.0
    sigma: float | tuple[float, float] = 3.0
    softmax_scale: float = SOFTMAX_SCALE

    @property
    def bins(self) -> tuple[int, int]:
        """``(Wx, Hy)``: bins along x and along y."""
        h, w = self.input_size
        return int(w * self.split_ratio), int(h * self.split_ratio)

    @property
    def sigmas(self) -> tuple[float, float]:
        s = self.sigma
        return (float(s), float(s)) if np.isscalar(s) else (float(s[0]), float(s[1]))

    # ---- targets -----------------------------------------------------------------------------
    def encode(self, keypoints: np.ndarray, visible: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """1-D Gaussian label smoothing per axis (SimCC; docs/methods.md section 1.2).

        keypoints (..., K, 2) crop pixels, visible (..., K) COCO v in {0, 1, 2}.
        Returns target_x (..., K, Wx), target_y (..., K, Hy) float32, weight (..., K) float32.
        Each target is normalised to sum to 1 (a distribution, so KL(target || softmax) is a
        proper divergence; mmpose scales to max 1 instead, which only changes the KL by a
        constant per joint). Weight is 0 for unlabelled joints (v = 0) and for joints whose bin
        position falls outside ``[0, Wx - 1] x [0, Hy - 1]``; their targets are uniform so a loss
        never sees a 0/0.
        """
        kp = np.asarray(keypoints, dtype=np.float64)
        vis = np.asarray(visible)
        wx, hy = self.bins
        sx, sy = self.sigmas
        mu_x = kp[..., 0] * self.split_ratio
        mu_y = kp[..., 1] * self.split_ratio
        inside = (mu_x >= 0) & (mu_x <= wx - 1) & (mu_y >= 0) & (mu_y <= hy - 1)
        weight = ((vis > 0) & inside).astype(np.float32)
        tx = _gaussian(mu_x, wx, sx, weight)
        ty = _gaussian(mu_y, hy, sy, weight)
        return tx, ty, weight

    def normalize_keypoints(self, keypoints):
        """Crop pixels (..., 2) -> ``(x / W, y / H)``: the scale :meth:`soft_argmax` returns."""
        h, w = self.input_size
        scale = keypoints.new_tensor([w, h]) if torch.is_tensor(keypoints) else np.array(
            [w, h], dtype=np.float32)
        return keypoints / scale

    # ---- predictions -------------------------------------------------------------------------
    def decode(self, logits_x: torch.Tensor, logits_y: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Argmax decoding: logits_x (B, K, Wx), logits_y (B, K, Hy) ->
        coords (B, K, 2) float32 crop pixels (``argmax / k``), scores (B, K) = min over the axes
        of the maximum of softmax(softmax_scale * logits) (docs/methods.md 1.2). No sub-bin refinement.
        """
        lx, ly = torch.as_tensor(logits_x), torch.as_tensor(logits_y)
        px = torch.softmax(lx.float() * self.softmax_scale, dim=-1)
        py = torch.softmax(ly.float() * self.softmax_scale, dim=-1)
        conf_x, bx = px.max(dim=-1)
        conf_y, by = py.max(dim=-1)
        coords = torch.stack([bx, by], dim=-1).float() / self.split_ratio
        return coords, torch.minimum(conf_x, conf_y)

    def soft_argmax(self, logits_x: torch.Tensor, logits_y: torch.Tensor) -> torch.Tensor:
        """Differentiable coordinates (B, K, 2) in [0, 1): see module-level :func:`soft_argmax`."""
        return soft_argmax(logits_x, logits_y, scale=self.softmax_scale)

    def flip_logits(self, logits_x: torch.Tensor, logits_y: torch.Tensor,
                    flip_index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Map logits predicted on a horizontally mirrored crop back to the original crop."""
        return flip_logits(logits_x, logits_y, flip_index, split_ratio=self.split_ratio,
                           width=self.input_size[1])


def _gaussian(mu: np.ndarray, bins: int, sigma: float, weight: np.ndarray) -> np.ndarray:
    """(..., K) means in bins -> (..., K, bins) float32 Gaussians summing to 1 (uniform if w=0)."""
    grid = np.arange(bins, dtype=np.float64)
    g = np.exp(-0.5 * ((grid - mu[..., None]) / sigma) ** 2)
    total = g.sum(-1, keepdims=True)
    ok = (weight[..., None] > 0) & (total > 0)
    g = np.where(ok, g / np.where(total > 0, total, 1.0), 1.0 / bins)
    return g.astype(np.float32)


def soft_argmax(logits_x: torch.Tensor, logits_y: torch.Tensor, scale: float = SOFTMAX_SCALE
                ) -> torch.Tensor:
    """Expected bin under softmax(scale * logits), divided by the bin count (TSD's L1 pose term).

    logits_x (B, K, Wx), logits_y (B, K, Hy) -> (B, K, 2) = ``(E[b_x] / Wx, E[b_y] / Hy)``,
    which equals ``(x / W, y / H)`` in crop pixels when ``W * k`` is an integer: compare it with
    :meth:`SimCCCodec.normalize_keypoints`, not with ``(x + 0.5) / W``. Computed in float32
    (a bf16 expectation over hundreds of bins would be off by about a bin).
    """
    out = []
    for logits in (logits_x, logits_y):
        n = logits.shape[-1]
        p = torch.softmax(logits.float() * scale, dim=-1)  # fp32: bf16 would lose ~1 bin
        grid = torch.arange(n, device=logits.device, dtype=p.dtype)
        out.append((p * grid).sum(-1) / n)
    return torch.stack(out, dim=-1)


def flip_logits(logits_x: torch.Tensor, logits_y: torch.Tensor, flip_index: Sequence[int],
                split_ratio: float = 2.0, width: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip test: logits of the mirrored crop -> logits in the original crop's frame.

    logits (B, K, Wx) / (B, K, Hy). Joints are permuted by ``flip_index`` (left <-> right) and
    the x bins are mirrored about pixel ``(W - 1) / 2``: ``out[b] = in[(W - 1) k - b]``, i.e.
    reverse, then shift by ``k - 1`` bins. For integer ``(W - 1) k`` this is an exact gather; the
    last ``k - 1`` bins (x > W - 1, outside every pixel centre) repeat the edge value. A
    fractional source position is linearly interpolated. ``width`` defaults to ``Wx / k``.
    """
    idx = torch.as_tensor(list(flip_index), device=logits_x.device, dtype=torch.long)
    lx, ly = logits_x.index_select(-2, idx), logits_y.index_select(-2, idx)
    wx = lx.shape[-1]
    w = width if width is not None else wx / split_ratio
    src = (w - 1) * split_ratio - torch.arange(wx, device=lx.device, dtype=torch.float64)
    lo = torch.floor(src + 1e-6)
    frac = (src - lo).clamp(0, 1)
    frac = torch.where(frac < 1e-6, torch.zeros_like(frac), frac)
    i0 = lo.long().clamp(0, wx - 1)
    i1 = (lo.long() + 1).clamp(0, wx - 1)
    out = lx.index_select(-1, i0)
    if bool((frac > 0).any()):
        f = frac.to(lx.dtype)
        out = out * (1 - f) + lx.index_select(-1, i1) * f
    return out, ly


def sigma_for_size(sigma: float, size: tuple[int, int], ref_size: tuple[int, int]
                   ) -> tuple[float, float]:
    """Per-axis sigma (bins) scaled from ``ref_size`` to ``size`` (both (H, W)), so the label
    smoothing covers the same fraction of the crop (docs/methods.md 1.2, scale sigma with size)."""
    return (sigma * size[1] / ref_size[1], sigma * size[0] / ref_size[0])

