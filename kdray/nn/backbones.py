"""timm backbones returning multi-scale feature maps for the SimCC pose model (docs/methods.md 1.2).

One dict, :data:`BACKBONES`, maps a config name (``model.backbone``) to the timm model name, its
create kwargs and which returned map feeds the SimCC head. Models are built with
``pretrained=False``; ImageNet initialisation (``model.pretrained``, or a local ``model.weights``
file) is loaded afterwards by kdray/nn/pretrained.py, which reports what it loaded.

What each backbone returns (timm order, high -> low resolution; measured with timm 1.0.31):

- HRNet (``feature_location=''``, ``out_indices=(1, 2, 3, 4)``): the four branches of the last
  stage (after its multi-resolution fusion) at 1/4, 1/8, 1/16, 1/32 of the input, e.g.
  32/64/128/256 channels for W32. The 1/4 branch feeds the head, as in SimCC's HRNet (whose
  ``final_layer`` reads branch 0). timm's default ``feature_location='incre'`` would instead pass
  the branches through the classifier's channel-increase bottlenecks (128/256/512/1024 channels):
  not the pose network. The stem (1/2, index 0) is left out: nothing uses it.
- ResNet: ``layer1..layer4`` at 1/4 .. 1/32; the 1/32 map feeds the head, as in the official
  SimCC ResNet without deconvolutions (mmpose ``SimCCHead`` with ``in_featuremap_size = size//32``).
- MobileNetV3: the stage outputs at 1/4, 1/8, 1/16; the 1/16 map feeds the head and the network is
  cut there (timm's ``feature_cls='getter'`` prunes the unused deeper blocks, so every parameter
  gets a gradient). Why 1/16: at the demo's 96x64 input the 1/32 map is 3x2 = 6 cells, and the
  SimCC Linear layers then map 6 numbers per joint to 128 or 192 bins (the logits live in a
  6-dimensional subspace); 1/16 gives 6x4 = 24 cells (48 channels, 0.2M parameters for the small
  net); 1/8 gives 96 cells but only three shallow stages (42k parameters, a receptive field too
  small to tell left from right on a whole figure). On SynthPose at 96x64 (1500 steps, batch 32)
  1/8 and 1/16 reached similar validation errors (10.7 / 10.9 px) while 1/16 fitted the training
  set better (loss 2.58 vs 3.27); 1/32 trained no better than 1/16. Another choice is one entry
  here (``head_stride``, ``out_indices``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

# timm and torch load in the functions that use them (5 s): kdray.config checks a config's
# backbone names and input sizes against BACKBONES at load, before anything heavy imports.
if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """timm name + create kwargs, the stride of the map that feeds the SimCC head, and the
    largest returned reduction (input H and W must be multiples of it; the config checks sizes
    with it at load, :func:`build_backbone` checks it against timm)."""
    timm_name: str
    kwargs: dict = field(default_factory=dict)
    head_stride: int = 4
    size_divisor: int = 32


_HRNET = {"feature_location": "", "out_indices": (1, 2, 3, 4)}
_PLAIN = {"out_indices": (1, 2, 3, 4)}
_MOBILE = {"feature_cls": "getter", "out_indices": (1, 2, 3)}

BACKBONES: dict[str, BackboneSpec] = {
    "hrnet_w18_small": BackboneSpec("hrnet_w18_small", _HRNET, head_stride=4),
    "hrnet_w18_small_v2": BackboneSpec("hrnet_w18_small_v2", _HRNET, head_stride=4),
    "hrnet_w32": BackboneSpec("hrnet_w32", _HRNET, head_stride=4),
    "hrnet_w48": BackboneSpec("hrnet_w48", _HRNET, head_stride=4),
    "resnet18": BackboneSpec("resnet18", _PLAIN, head_stride=32),
    "resnet50": BackboneSpec("resnet50", _PLAIN, head_stride=32),
    "mobilenetv3_small_100": BackboneSpec("mobilenetv3_small_100", _MOBILE, head_stride=16,
                                          size_divisor=16),
    "mobilenetv3_large_100": BackboneSpec("mobilenetv3_large_100", _MOBILE, head_stride=16,
                                          size_divisor=16),
}


@dataclass(frozen=True)
class BackboneInfo:
    """What ``module(images)`` returns: a list of maps in timm order (high -> low resolution).

    channels[i], reductions[i] describe map i; ``head_index`` is the map that feeds the SimCC
    head; inputs must have H and W divisible by ``size_divisor`` (the largest reduction).
    ``weights`` is the load report of :func:`load_weights` ("" when no file was given).
    """
    name: str
    timm_name: str
    channels: tuple[int, ...]
    reductions: tuple[int, ...]
    head_index: int
    size_divisor: int
    weights: str = ""


def build_backbone(name: str, weights: str = "") -> tuple[nn.Module, BackboneInfo]:
    """Build backbone ``name`` (a key of :data:`BACKBONES`); optionally load a timm
    classification checkpoint ``weights`` (a file, :func:`kdray.nn.pretrained.load_weights`).

    Returns ``(module, info)``; ``module(images (B, 3, H, W))`` is a list of (B, C_i, H/r_i, W/r_i).
    Unknown names raise ValueError listing the known ones.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r} (model.backbone); known: "
                         f"{', '.join(sorted(BACKBONES))}")
    spec = BACKBONES[name]
    import timm
    module = timm.create_model(spec.timm_name, pretrained=False, features_only=True,
                               **spec.kwargs)
    channels = tuple(int(c) for c in module.feature_info.channels())
    reductions = tuple(int(r) for r in module.feature_info.reduction())
    if spec.head_stride not in reductions:  # a dict entry and timm disagree: fail at build
        raise ValueError(f"backbone {name!r}: head stride {spec.head_stride} not among the "
                         f"returned reductions {reductions}")
    if spec.size_divisor != max(reductions):
        raise ValueError(f"backbone {name!r}: size_divisor {spec.size_divisor} is not the largest "
                         f"returned reduction {max(reductions)}")
    from kdray.nn.pretrained import load_weights
    report = load_weights(module, spec.timm_name, weights) if weights else ""
    info = BackboneInfo(name, spec.timm_name, channels, reductions,
                        head_index=reductions.index(spec.head_stride),
                        size_divisor=max(reductions), weights=report)
    return module, info
