"""IGP-GCN: the image-guided progressive GCN of TSD stage 2 (Ji et al. Sec. III-B, after
OPEC-Net); docs/methods.md section 2.2.

Input: the frozen student's initial pose P_init (B, K, 3) = (x, y, confidence) with x, y
normalised to [0, 1] by the input width/height, and three student feature maps, low -> high
resolution: F1 (B, C1, H/16, W/16), F2 (B, C2, H/8, W/8), F3 (B, C3, H/4, W/4).
Output: [P1, P2, P3], each (B, K, 2) normalised; P3 is the refined pose. The per-block losses
are ``kdray.losses.tsd.gcn_block_loss`` (Eq. 6) combined by ``stage2_loss`` (Eq. 7).

Layer 1 lifts P_init to ``hidden`` features with a graph conv; block i (i = 1, 2, 3; the
paper's second to fourth layers) samples joint features J_i from F_i at the current pose
P_{i-1} (progressive, P_0 = P_init[..., :2]), concatenates them to the node states, applies two
graph convs with a residual and an SE-style joint attention, and regresses P_i = P_{i-1} +
delta_i. The offset heads start at zero, so an untrained IGP-GCN returns the student's pose.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sample_joint_features(feat: Tensor, xy: Tensor) -> Tensor:
    """J = F sampled at the joints: feat (B, C, h, w), xy (B, K, 2) in [0, 1] -> (B, K, C).

    Normalised coordinate u spans the map edge to edge (u = 0 the left edge of the first pixel,
    u = 1 the right edge of the last), matching ``grid_sample(align_corners=False)`` after the
    map [0, 1] -> [-1, 1]; pixel j's centre is u = (j + 0.5) / w. Bilinear; joints outside the
    map read zeros (grid_sample's default, as in OPEC-Net).
    """
    grid = (xy * 2.0 - 1.0).unsqueeze(2).to(feat.dtype)                      # (B, K, 1, 2)
    sampled = F.grid_sample(feat, grid, mode="bilinear", align_corners=False)  # (B, C, K, 1)
    return sampled.squeeze(-1).transpose(1, 2)                               # (B, K, C)


def normalized_adjacency(num_joints: int, skeleton: Sequence[tuple[int, int]]) -> Tensor:
    """Row-normalised D^-1 (A + I), (K, K): A the symmetric skeleton adjacency."""
    a = torch.eye(num_joints)
    for i, j in skeleton:
        a[i, j] = a[j, i] = 1.0
    return a / a.sum(dim=1, keepdim=True)


class GraphConv(nn.Module):
    """Graph conv with separate self / neighbour weights (SemGCN, used by OPEC-Net).

    x (B, K, Cin), adj (K, K) row-normalised -> diag(adj) * x W_self + offdiag(adj) @ x W_nbr.
    Two weights keep a joint's own feature from being averaged away by its neighbours.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.self_fc = nn.Linear(in_dim, out_dim)
        self.nbr_fc = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        diag = torch.diagonal(adj)                                          # (K,)
        off = adj - torch.diag_embed(diag)                                  # (K, K)
        return diag[:, None] * self.self_fc(x) + off @ self.nbr_fc(x)       # (B, K, Cout)


class JointAttention(nn.Module):
    """SE-style attention over joints: squeeze the feature dim, excite one gate per joint.

    h (B, K, C) -> h * sigmoid(MLP(mean_C h)) with the MLP K -> r -> K.
    """

    def __init__(self, num_joints: int, reduction: int = 2):
        super().__init__()
        mid = max(num_joints // reduction, 8)   # wide enough that not every unit starts dead
        self.excite = nn.Sequential(nn.Linear(num_joints, mid), nn.ReLU(inplace=True),
                                    nn.Linear(mid, num_joints), nn.Sigmoid())

    def forward(self, h: Tensor) -> Tensor:
        gate = self.excite(h.mean(dim=-1))                                  # (B, K)
        return h * gate.unsqueeze(-1)


class ResGCNAttentionBlock(nn.Module):
    """One progressive block: sample J_i at P_{i-1}, [h, J_i] -> 2 graph convs + residual ->
    joint attention -> offset delta_i (B, K, 2). Returns (new node states, P_i).

    LayerNorm rather than OPEC-Net's BatchNorm (decision): the block then behaves the same in
    train and eval and with batch size 1.
    """

    def __init__(self, num_joints: int, feat_channels: int, hidden: int):
        super().__init__()
        self.gc1 = GraphConv(hidden + feat_channels, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.gc2 = GraphConv(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.attention = JointAttention(num_joints)
        self.offset = nn.Linear(hidden, 2)
        nn.init.zeros_(self.offset.weight)   # P_i starts at P_{i-1}: training refines the
        nn.init.zeros_(self.offset.bias)     # student's pose instead of first undoing noise

    def forward(self, h: Tensor, xy: Tensor, feat: Tensor, adj: Tensor) -> tuple[Tensor, Tensor]:
        joint_feat = sample_joint_features(feat, xy)                        # (B, K, C_i)
        y = F.relu(self.norm1(self.gc1(torch.cat([h, joint_feat], dim=-1), adj)))
        y = self.norm2(self.gc2(y, adj))
        h = self.attention(F.relu(h + y))                                   # (B, K, hidden)
        return h, xy + self.offset(h)                                       # P_i (B, K, 2)


class IGPGCN(nn.Module):
    """Image-guided progressive GCN (TSD Sec. III-B).

    num_joints K; skeleton the KeypointSpec edges; feat_channels (C1, C2, C3) of the student
    maps low -> high resolution (1/16, 1/8, 1/4); hidden the node size (128 as OPEC-Net);
    learn_edges: learnt edge weights on the support of A + I, row-softmaxed (OPEC-Net / SemGCN);
    they start at zero logits, i.e. exactly D^-1 (A + I). One adjacency is shared by all layers.
    """

    def __init__(self, num_joints: int, skeleton: Sequence[tuple[int, int]],
                 feat_channels: tuple[int, int, int], hidden: int = 128,
                 learn_edges: bool = True):
        super().__init__()
        if len(feat_channels) != 3:
            raise ValueError(f"IGP-GCN takes three feature maps, got channels {feat_channels}")
        self.num_joints = num_joints
        self.feat_channels = tuple(int(c) for c in feat_channels)
        adj = normalized_adjacency(num_joints, skeleton)
        self.register_buffer("adj_norm", adj)                 # D^-1 (A + I)      (K, K)
        self.register_buffer("support", adj > 0)              # where A + I is 1  (K, K)
        # zero logits on the support: the row softmax starts exactly at D^-1 (A + I)
        logits = nn.Parameter(torch.zeros(num_joints, num_joints)) if learn_edges else None
        self.register_parameter("edge_logits", logits)
        self.input_gc = GraphConv(3, hidden)
        self.input_norm = nn.LayerNorm(hidden)
        self.blocks = nn.ModuleList(
            ResGCNAttentionBlock(num_joints, c, hidden) for c in self.feat_channels)

    def adjacency(self) -> Tensor:
        """The (K, K) propagation matrix; every row sums to 1, zero off the skeleton support."""
        if self.edge_logits is None:
            return self.adj_norm
        logits = self.edge_logits.masked_fill(~self.support, float("-inf"))
        return torch.softmax(logits, dim=1)

    def forward(self, p_init: Tensor, feats: Sequence[Tensor]) -> list[Tensor]:
        """p_init (B, K, 3) = (x, y, conf), x, y in [0, 1]; feats [F1, F2, F3] low -> high
        resolution, F_i (B, C_i, h_i, w_i). Returns [P1, P2, P3], each (B, K, 2)."""
        if len(feats) != 3:
            raise ValueError(f"IGP-GCN takes three feature maps, got {len(feats)}")
        if p_init.shape[1:] != (self.num_joints, 3):
            raise ValueError(f"p_init must be (B, {self.num_joints}, 3), got {tuple(p_init.shape)}")
        for i, (f, c) in enumerate(zip(feats, self.feat_channels)):
            if f.shape[1] != c:
                raise ValueError(f"feature map {i + 1} has {f.shape[1]} channels, expected {c}")
        adj = self.adjacency()
        h = F.relu(self.input_norm(self.input_gc(p_init, adj)))            # (B, K, hidden)
        xy = p_init[..., :2]
        poses = []
        for block, feat in zip(self.blocks, feats):
            h, xy = block(h, xy, feat, adj)
            poses.append(xy)
        return poses
