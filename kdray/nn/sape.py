"""Scale-adaptive projector ensemble (SAPE), CDKD Sec. III-A, Eqs. (1)-(4).

The low-resolution student's last feature (B, Cs, hs, ws) is mapped onto the high-resolution
teacher's last feature (B, Ct, Ht, Wt) by N projectors; a scale-adaptive unit (SAU, after SKNet)
looks at the student feature through convolutions of several kernel sizes and decides, per sample
and per channel, how much each projector contributes (Eq. 4). The result feeds L_fea (Eq. 5,
`kdray.losses.cdkd.cosine_feature_loss`). The module is training-only: it is thrown away with the
teacher at inference.

Readings of the paper's text (docs/methods.md sections 3.2 and 4), in the order the data flows:
- Projector k (Sec. III-A1, "a FC layer and a ReLU"): bilinear upsample to (Ht, Wt), then a 1x1
  conv Cs -> Ct (an FC per pixel), then ReLU -> F_k (B, Ct, Ht, Wt).
- Eq. (1): branch i = Conv_i(k_i x k_i, Cs -> Ct, padding k_i // 2) + BN + ReLU on the *upsampled*
  student feature, so every branch shares the teacher grid. BN + ReLU as in SKNet's branches.
- Eq. (2), Fus = "a fully connected layer, a global pooling layer and a summation layer": the
  concat (B, M*Ct, Ht, Wt) of the M branches goes through a 1x1 conv with groups=M (one FC per
  branch, Ct -> d, + BN + ReLU as SKNet's fc), global average pooling -> (B, M, d), and the sum over
  branches -> z (B, d). Grouping keeps "sum over branches" meaningful (a dense conv followed by a
  sum would just be one smaller dense conv). d = max(Ct // reduction, min_dim) as in SKNet.
- Eq. (3), Select = "multiple FC layers, a concatenation layer and a softmax layer": one Linear
  d -> Ct per projector, stacked to (B, N, Ct), softmax over the N projectors -> w (B, N, Ct);
  the weights of the N projectors sum to 1 for every channel.
- Eq. (4): F_out = sum_k w_k (x) F_k, w_k broadcast over the spatial grid.
Without SAU (Table III "projector ensemble") the weights are the constant 1/N.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_SIZES = (3, 5, 7, 9)  # the sizes that a kernel-mix string counts, in order (Table VII)


def parse_kernel_mix(mix: str | tuple[int, ...] | list[int]) -> tuple[int, int, int, int]:
    """'1-1-2-0' -> (1, 1, 2, 0): how many SAU branches of size 3x3, 5x5, 7x7, 9x9 (Table VII)."""
    parts = mix.split("-") if isinstance(mix, str) else list(mix)
    if len(parts) != len(KERNEL_SIZES):
        raise ValueError(f"kernel mix {mix!r} must give 4 counts (3x3-5x5-7x7-9x9)")
    try:
        counts = tuple(int(p) for p in parts)
    except ValueError as err:
        raise ValueError(f"kernel mix {mix!r} must be integers, e.g. '1-1-2-0'") from err
    if any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"kernel mix {mix!r} needs non-negative counts and at least one branch")
    return counts  # type: ignore[return-value]


def _branch_kernel_sizes(counts: tuple[int, ...]) -> list[int]:
    """(1, 1, 2, 0) -> [3, 5, 7, 7]."""
    return [k for k, n in zip(KERNEL_SIZES, counts) for _ in range(n)]


class ScaleAdaptiveUnit(nn.Module):
    """SAU, Eqs. (1)-(3): upsampled student feature (B, Cs, Ht, Wt) -> weights w (B, N, Ct)."""

    def __init__(self, student_channels: int, teacher_channels: int, num_projectors: int,
                 kernel_mix: tuple[int, ...], reduction: int = 16, min_dim: int = 32) -> None:
        super().__init__()
        sizes = _branch_kernel_sizes(parse_kernel_mix(kernel_mix))
        self.num_branches = len(sizes)
        self.num_projectors = num_projectors
        self.teacher_channels = teacher_channels
        self.dim = max(teacher_channels // reduction, min_dim)
        # Eq. (1): F'_i = Conv_i(F^s); bias-free because BN follows.
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(student_channels, teacher_channels, k, padding=k // 2, bias=False),
                nn.BatchNorm2d(teacher_channels),
                nn.ReLU(inplace=True),
            )
            for k in sizes
        )
        # Eq. (2): Fus; groups=M makes it one FC per branch on the concatenation.
        m = self.num_branches
        self.fuse = nn.Sequential(
            nn.Conv2d(m * teacher_channels, m * self.dim, 1, groups=m, bias=False),
            nn.BatchNorm2d(m * self.dim),
            nn.ReLU(inplace=True),
        )
        # Eq. (3): Select; one FC per projector.
        self.select = nn.ModuleList(nn.Linear(self.dim, teacher_channels)
                                    for _ in range(num_projectors))

    def forward(self, student_up: torch.Tensor) -> torch.Tensor:
        """student_up (B, Cs, Ht, Wt) -> w (B, N, Ct), softmax across the N projectors."""
        fused = self.fuse(torch.cat([b(student_up) for b in self.branches], dim=1))
        pooled = fused.mean(dim=(2, 3))                                      # (B, M*d)
        z = pooled.view(-1, self.num_branches, self.dim).sum(dim=1)          # (B, d)
        logits = torch.stack([fc(z) for fc in self.select], dim=1)           # (B, N, Ct)
        return logits.softmax(dim=1)


class SAPE(nn.Module):
    """Projector ensemble + SAU: student feature (B, Cs, hs, ws) -> teacher-shaped (B, Ct, Ht, Wt).

    Args:
        student_channels: Cs of the student's last feature (the SimCC head's input).
        teacher_channels: Ct of the teacher's last feature.
        teacher_hw: (Ht, Wt) of the teacher's last feature.
        num_projectors: N (Table VI; 3 is the paper's best).
        kernel_mix: SAU branch counts of 3x3, 5x5, 7x7, 9x9, a tuple or a '1-1-2-0' string.
        use_sau: False = plain ensemble with equal weights 1/N (Table III "projector ensemble").
        reduction, min_dim: SAU bottleneck d = max(Ct // reduction, min_dim) (SKNet's r and L).
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 teacher_hw: tuple[int, int], num_projectors: int = 3,
                 kernel_mix: tuple[int, ...] | str = (1, 1, 2, 0), use_sau: bool = True,
                 reduction: int = 16, min_dim: int = 32) -> None:
        super().__init__()
        if num_projectors < 1:
            raise ValueError(f"num_projectors must be >= 1, got {num_projectors}")
        self.teacher_hw = (int(teacher_hw[0]), int(teacher_hw[1]))
        self.num_projectors = num_projectors
        self.teacher_channels = teacher_channels
        # Different random inits are what make the ensemble members differ (Sec. III-A1).
        self.projectors = nn.ModuleList(
            nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1), nn.ReLU())
            for _ in range(num_projectors)
        )
        self.sau = (ScaleAdaptiveUnit(student_channels, teacher_channels, num_projectors,
                                      parse_kernel_mix(kernel_mix), reduction, min_dim)
                    if use_sau else None)

    def forward(self, student_feat: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """student_feat (B, Cs, hs, ws) -> dict(out (B, Ct, Ht, Wt), weights (B, N, Ct),
        projections [F_k (B, Ct, Ht, Wt)] * N)."""
        up = F.interpolate(student_feat, size=self.teacher_hw, mode="bilinear",
                           align_corners=False)
        projections = [p(up) for p in self.projectors]
        if self.sau is not None:
            weights = self.sau(up)
        else:
            weights = up.new_full((up.shape[0], self.num_projectors, self.teacher_channels),
                                  1.0 / self.num_projectors)
        stacked = torch.stack(projections, dim=1)                            # (B, N, Ct, Ht, Wt)
        out = (weights[..., None, None] * stacked).sum(dim=1)                # Eq. (4)
        return {"out": out, "weights": weights, "projections": projections}
