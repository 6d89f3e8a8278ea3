"""The top-down SimCC pose model: timm backbone + SimCC head (docs/methods.md section 1.2; the
model contract: docs/architecture.md, "Contracts").

``forward(images)`` returns ``dict(feats, logits_x, logits_y)``; ``predict(images, flip_test)``
returns decoded keypoints (crop pixels) and scores through the model's codec, the one the stage
builds (kdray.stages.codec_for) or the checkpoint's meta describes (kdray.inference). The
knowledge-distillation code reads the features it needs from ``feats`` directly (no hooks, no
module paths):

- ``feats[-1]`` is always the SimCC head's input: TSD's L_fea (Eq. 1) and CDKD's SAPE / L_fea
  (Eqs. 1-5) use it.
- ``feats[-3:]`` are the three maps TSD's IGP-GCN samples (stage 2, blocks 2-4).

Order, per backbone family (``model.feat_strides`` gives the reductions w.r.t. the input):

- HRNet: [1/32, 1/16, 1/8, 1/4], the last stage's four parallel branches (all equally deep),
  low -> high resolution; the 1/4 branch feeds the head and is last, so ``feats[-3:]`` =
  1/16, 1/8, 1/4 as in TSD.
- Plain CNNs, whose head reads their deepest map: the maps in forward order (shallow -> deep =
  high -> low resolution), the head input last. ResNet [1/4, 1/8, 1/16, 1/32] (``feats[-3:]`` =
  1/8, 1/16, 1/32); MobileNetV3 [1/4, 1/8, 1/16] (the net is cut at the head's 1/16 map).
Every map in ``feats`` lies on the path to the logits, except HRNet's 1/8-1/32 branches, whose
last fusion layers get no gradient from the SimCC loss alone (DDP: find_unused_parameters).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from kdray.codecs.simcc import SimCCCodec
from kdray.config import ConfigError, ModelConfig
from kdray.nn.backbones import BackboneInfo, build_backbone
from kdray.nn.pretrained import backbone_weights
from kdray.nn.simcc_head import SimCCHead


def check_input_size(input_size: tuple[int, int], info: BackboneInfo,
                     field: str = "data.input_size") -> tuple[int, int]:
    """(H, W) must be positive and divisible by the backbone's largest reduction (HRNet: 32,
    its fusion layers upsample the 1/32 branch by exact factors). Raises ConfigError (a
    ValueError) naming ``field``, the config key the size came from."""
    try:
        h, w = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise ConfigError(f"{field} must be (H, W), got {input_size!r}") from None
    d = info.size_divisor
    if h <= 0 or w <= 0 or h % d or w % d:
        ok = (max(d, h // d * d), max(d, w // d * d))
        raise ConfigError(f"{field} = ({h}, {w}): backbone {info.name} needs H and W divisible by "
                         f"{d} (its coarsest feature is 1/{d} of the input); e.g. {ok}")
    return h, w


class PoseModel(nn.Module):
    """SimCC pose model. images (B, 3, H, W), ImageNet-normalised float ->
    dict(feats=[(B, C_i, H/s_i, W/s_i) ...], logits_x (B, K, int(W*k)), logits_y (B, K, int(H*k))).

    ``codec`` fixes the input size (H, W) and the split ratio k; ``flip_index`` the joints (K of
    them) and their left/right swap for the flip test. Neither is a parameter: the state dict
    holds the weights only. Attributes: ``feat_channels`` and ``feat_strides`` (lists, same
    order as ``feats``), ``num_joints``, ``input_size`` (H, W), ``split_ratio``, ``bins``
    (Wx, Hy), ``backbone_info``, ``codec``, ``flip_index``.
    """

    def __init__(self, model_cfg: ModelConfig, codec: SimCCCodec, flip_index: Sequence[int], *,
                 size_field: str = "data.input_size"):
        super().__init__()
        self.backbone, info = build_backbone(model_cfg.backbone, backbone_weights(model_cfg))
        h, w = check_input_size(codec.input_size, info, size_field)
        head = info.head_index
        n = len(info.reductions)
        if head == n - 1:          # plain CNN: the head reads the deepest map; keep forward order
            self._order = list(range(n))
        else:                      # HRNet: parallel branches low -> high resolution, head last
            others = [i for i in range(n) if i != head]
            self._order = [*sorted(others, key=lambda i: -info.reductions[i]), head]
        self.feat_channels = [info.channels[i] for i in self._order]
        self.feat_strides = [info.reductions[i] for i in self._order]
        self.backbone_info = info
        self.codec, self.flip_index = codec, [int(i) for i in flip_index]
        self.num_joints = len(self.flip_index)
        self.input_size = (h, w)
        self.split_ratio = float(codec.split_ratio)
        self.bins = (int(w * self.split_ratio), int(h * self.split_ratio))    # (Wx, Hy)
        s = self.feat_strides[-1]
        self.head = SimCCHead(self.feat_channels[-1], self.num_joints, (h // s, w // s),
                              self.bins, init_scale=model_cfg.head_init_scale)

    def forward(self, images: Tensor) -> dict:
        maps = self.backbone(images)                  # timm order: high -> low resolution
        feats = [maps[i] for i in self._order]
        # the classifiers stay in fp32 under autocast: softmax(10 * logits) over ~200 bins needs
        # more than bf16's 8 mantissa bits (SimCC training diverged with a bf16 head on CPU)
        with torch.autocast(images.device.type, enabled=False):
            logits_x, logits_y = self.head(feats[-1].float())
        return {"feats": feats, "logits_x": logits_x, "logits_y": logits_y}

    def logits(self, images: Tensor, flip_test: bool = True) -> tuple[Tensor, Tensor, dict]:
        """fp32 logits (B, K, Wx), (B, K, Hy), with ``flip_test`` averaged with the mirrored
        crop's (mapped back by :meth:`SimCCCodec.flip_logits`), and the un-mirrored forward's
        outputs (its ``feats`` feed the IGP-GCN)."""
        out = self(images)
        lx, ly = out["logits_x"].float(), out["logits_y"].float()
        if flip_test:
            f = self(images.flip(-1))
            fx, fy = self.codec.flip_logits(f["logits_x"].float(), f["logits_y"].float(),
                                            self.flip_index)
            lx, ly = (lx + fx) / 2, (ly + fy) / 2
        return lx, ly, out

    @torch.no_grad()
    def predict(self, images: Tensor, flip_test: bool = True) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) normalised -> coords (B, K, 2) in crop pixels and scores (B, K):
        the codec's argmax decoding (docs/methods.md 1.2) of :meth:`logits`."""
        lx, ly, _ = self.logits(images, flip_test)
        return self.codec.decode(lx, ly)


def build_pose_model(model_cfg: ModelConfig, codec: SimCCCodec, flip_index: Sequence[int], *,
                     size_field: str = "data.input_size") -> PoseModel:
    """A :class:`PoseModel` for ``codec.input_size`` and ``len(flip_index)`` joints;
    ``size_field`` names the config key of the input size in errors (e.g.
    ``cdkd.low_res_size`` for the CDKD student)."""
    return PoseModel(model_cfg, codec, flip_index, size_field=size_field)
