"""Student + IGP-GCN as one module: the TSD stage-2 model that ``kdray predict`` runs.

TSD Sec. III-B: the frozen student's SimCC pose P_init (K x 3: x, y normalised to [0, 1] and
confidence) and its feature maps (1/16, 1/8, 1/4 of the input) feed the IGP-GCN, whose last
block gives the refined pose P_3. The student's part, :meth:`RefinedPoseModel.frozen_inputs`,
is a pure function of the image while the student is frozen, so it can be precomputed
(kdray/data/frozen_cache.py stores it) and handed back to :meth:`RefinedPoseModel.predict` /
:meth:`RefinedPoseModel.refine` as ``frozen=``.
"""
from __future__ import annotations

import torch
from torch import nn


def gcn_feature_indices(strides: list[int]) -> list[int]:
    """Indices of the three finest maps in ``feats``, coarse -> fine (HRNet: 1/16, 1/8, 1/4)."""
    finest = sorted(range(len(strides)), key=lambda i: strides[i])[:3]
    return sorted(finest, key=lambda i: -strides[i])


def gcn_feature_channels(student: nn.Module) -> tuple[int, ...]:
    return tuple(student.feat_channels[i] for i in gcn_feature_indices(student.feat_strides))


class RefinedPoseModel(nn.Module):
    """A frozen :class:`~kdray.nn.pose_model.PoseModel` (decoding with its codec) + IGP-GCN;
    the same ``predict(images, flip_test) -> (coords, scores)`` as the pose model.

    The frozen student's outputs are a flat dict of tensors under :attr:`frozen_keys`, so a
    batch can carry them like any other column (kdray/data/frozen_cache.py stores one column
    per key).
    """
    frozen_keys = ("p_init", "feat0", "feat1", "feat2")   # feat0..2: the maps, coarse -> fine

    def __init__(self, student: nn.Module, gcn: nn.Module):
        super().__init__()
        self.student, self.gcn = student, gcn
        self.feat_index = gcn_feature_indices(student.feat_strides)
        h, w = student.input_size
        self.register_buffer("wh", torch.tensor([float(w), float(h)]), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.eval()  # frozen: BatchNorm statistics must not drift in stage 2
        return self

    @torch.no_grad()  # the student is frozen in stage 2
    def frozen_inputs(self, images: torch.Tensor, flip_test: bool = True) -> dict:
        """The GCN's inputs from the frozen student, keyed by :attr:`frozen_keys`: ``p_init``
        (B, K, 3) = its decoded pose / (W, H) and score, ``feat0..2`` its three maps (coarse ->
        fine) in fp32. The frozen-output cache stores exactly these."""
        lx, ly, out = self.student.logits(images, flip_test)
        coords, scores = self.student.codec.decode(lx, ly)
        p_init = torch.cat([coords / self.wh, scores.unsqueeze(-1)], dim=-1)
        maps = [out["feats"][i].float() for i in self.feat_index]
        return dict(zip(self.frozen_keys, [p_init, *maps]))

    def refine(self, images: torch.Tensor | None = None, flip_test: bool = True,
               frozen: dict | None = None) -> dict:
        """images (B, 3, H, W) normalised, or ``frozen`` (what :meth:`frozen_inputs` returned,
        e.g. read from the cache; then no images are needed) -> poses [P1, P2, P3] (B, K, 2) in
        [0, 1] and the student's scores (B, K)."""
        if frozen is None:
            frozen = self.frozen_inputs(images, flip_test)
        p_init, *maps = (frozen[k] for k in self.frozen_keys)
        return {"poses": self.gcn(p_init, maps), "scores": p_init[..., 2]}

    @torch.no_grad()
    def predict(self, images: torch.Tensor | None = None, flip_test: bool = True,
                frozen: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> coords (B, K, 2) of P_3 in crop pixels and scores (B, K); inputs as in
        :meth:`refine` (the flip test applies to the student's pose)."""
        out = self.refine(images, flip_test, frozen)
        return out["poses"][-1] * self.wh, out["scores"]

    def forward(self, images: torch.Tensor) -> dict:
        out = self.refine(images, flip_test=False)
        return {"refined": out["poses"][-1] * self.wh, "scores": out["scores"]}
