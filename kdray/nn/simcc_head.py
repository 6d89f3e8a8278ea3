"""SimCC head (Li et al., SimCC, ECCV 2022; docs/methods.md section 1.2).

The head input (B, C, h, w) is turned into K keypoint maps by a 1x1 convolution, each map is
flattened to a vector of h*w cells, and one Linear layer per axis classifies it into the
sub-pixel bins: ``logits_x`` (B, K, W*k) and ``logits_y`` (B, K, H*k), k the split ratio. The
official head's optional MLP between flatten and the classifiers (RTMCC's GAU) is left out: the
plain Linear layers are the SimCC baseline the TSD and CDKD papers start from.

Initialisation: the loss uses softmax(10 * logits) (kdray.codecs.simcc.SOFTMAX_SCALE), so PyTorch's
default Linear init (weights up to 1/sqrt(h*w)) starts with distributions sharply peaked on random
bins, and training plateaus for minutes (docs/operations.md, "CPU demo facts"). The two
classifiers' weights are therefore scaled by ``init_scale`` (``model.head_init_scale``, 0.1 by
default) and their biases set to zero, so the first predictions are close to uniform. mmpose
initialises them as N(0, 0.01), zero bias: the same idea.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class SimCCHead(nn.Module):
    """1x1 conv C -> K, flatten to (B, K, h*w), Linear to W*k bins (x) and H*k bins (y).

    in_channels C and feat_size (h, w) describe the head input; bins = (Wx, Hy) the number of
    x and y bins (``int(W * k)``, ``int(H * k)``).
    """

    def __init__(self, in_channels: int, num_joints: int, feat_size: tuple[int, int],
                 bins: tuple[int, int], init_scale: float = 0.1):
        super().__init__()
        self.feat_size = (int(feat_size[0]), int(feat_size[1]))
        self.bins = (int(bins[0]), int(bins[1]))
        cells = self.feat_size[0] * self.feat_size[1]
        self.final_layer = nn.Conv2d(in_channels, num_joints, kernel_size=1)
        self.mlp_head_x = nn.Linear(cells, self.bins[0])
        self.mlp_head_y = nn.Linear(cells, self.bins[1])
        with torch.no_grad():
            for lin in (self.mlp_head_x, self.mlp_head_y):
                lin.weight.mul_(init_scale)
                lin.bias.zero_()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, h, w) -> logits_x (B, K, Wx), logits_y (B, K, Hy)."""
        if tuple(x.shape[-2:]) != self.feat_size:
            raise ValueError(f"SimCC head built for a {self.feat_size} feature map (from the "
                             f"model's input size), got {tuple(x.shape[-2:])}: feed images of "
                             f"the size the model was built for")
        # flatten, not view: a channels_last conv output is not contiguous in (B, K, h*w) order
        x = self.final_layer(x).flatten(2)                     # (B, K, h*w)
        return self.mlp_head_x(x), self.mlp_head_y(x)
