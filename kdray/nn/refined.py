"""Student + IGP-GCN as one module: the TSD stage-2 model that ``kdray predict`` runs.

TSD Sec. III-B: the frozen student's SimCC pose P_init (K x 3: x, y normalised to [0, 1] and
confidence) and its feature maps (1/16, 1/8, 1/4 of the input) feed the IGP-GCN, whose last
block gives the refined pose P_3.
"""
from __future__ import annotations

import torch
from torch import nn

from kdray.codecs.simcc import SimCCCodec, flip_logits


def simcc_logits(model: nn.Module, images: torch.Tensor, flip_index: list[int],
                 flip_test: bool, split_ratio: float = 2.0
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits of ``model`` (B, K, Wx), (B, K, Hy), averaged with the mirrored image's."""
    out = model(images)
    lx, ly = out["logits_x"].float(), out["logits_y"].float()
    if flip_test:
        f = model(images.flip(-1))
        fx, fy = flip_logits(f["logits_x"].float(), f["logits_y"].float(), flip_index,
                             split_ratio=split_ratio)
        lx, ly = (lx + fx) / 2, (ly + fy) / 2
    return lx, ly, out


def gcn_feature_indices(strides: list[int]) -> list[int]:
    """Indices of the three finest maps in ``feats``, coarse -> fine (HRNet: 1/16, 1/8, 1/4)."""
    finest = sorted(range(len(strides)), key=lambda i: strides[i])[:3]
    return sorted(finest, key=lambda i: -strides[i])


def gcn_feature_channels(student: nn.Module) -> tuple[int, ...]:
    return tuple(student.feat_channels[i] for i in gcn_feature_indices(student.feat_strides))


class RefinedPoseModel(nn.Module):
    def __init__(self, student: nn.Module, gcn: nn.Module, codec: SimCCCodec,
                 flip_index: list[int]):
        super().__init__()
        self.student, self.gcn, self.codec, self.flip_index = student, gcn, codec, flip_index
        self.feat_index = gcn_feature_indices(student.feat_strides)
        h, w = codec.input_size
        self.register_buffer("wh", torch.tensor([float(w), float(h)]), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.eval()  # frozen: BatchNorm statistics must not drift in stage 2
        return self

    @torch.no_grad()  # the student is frozen in stage 2
    def frozen_inputs(self, images: torch.Tensor, flip_test: bool = True) -> dict:
        """The GCN's inputs from the frozen student: p_init (B, K, 3) and its three maps
        (coarse -> fine). kdray/data/frozen_cache.py stores exactly these per epoch."""
        lx, ly, out = simcc_logits(self.student, images, self.flip_index, flip_test,
                                   self.codec.split_ratio)
        coords, scores = self.codec.decode(lx, ly)
        p_init = torch.cat([coords / self.wh, scores.unsqueeze(-1)], dim=-1)
        return {"p_init": p_init, "feats": [out["feats"][i].float() for i in self.feat_index]}

    def refine(self, images: torch.Tensor, flip_test: bool = True) -> dict:
        """images (B, 3, H, W) normalised -> poses [P1, P2, P3] (B, K, 2) in [0, 1], scores."""
        return self.refine_from(**self.frozen_inputs(images, flip_test))

    def refine_from(self, p_init: torch.Tensor, feats: list[torch.Tensor]) -> dict:
        """The GCN on given frozen-student outputs (computed now or read from a cache)."""
        poses = self.gcn(p_init, feats)
        return {"poses": poses, "scores": p_init[..., 2], "coords_init": p_init[..., :2] * self.wh}

    def forward(self, images: torch.Tensor) -> dict:
        out = self.refine(images, flip_test=False)
        return {"refined": out["poses"][-1] * self.wh, "scores": out["scores"]}
