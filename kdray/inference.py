"""Rebuild a trained network from its checkpoint and run it on images (``kdray predict``).

A checkpoint (kdray.train) carries ``meta``: the model config, input size, joint layout and
kind (``simcc`` or ``refined`` = student + IGP-GCN), so loading needs nothing but the file, read
with ``torch.load(weights_only=True)``; the rebuilt network holds the codec the meta describes
and both kinds answer ``predict(images, flip_test) -> (coords, scores)``. The MLflow pyfunc
wrapper uses the same code.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdray.codecs.simcc import SimCCCodec
from kdray.config import ModelConfig, from_dict, to_dict
from kdray.data.dataset import normalize
from kdray.data.keypoints import KeypointSpec, spec_for
from kdray.data.transforms import back_to_image, box_to_center_scale, get_affine
from kdray.nn.igp_gcn import IGPGCN
from kdray.nn.pose_model import build_pose_model
from kdray.nn.refined import RefinedPoseModel, gcn_feature_channels
from kdray.train import CheckpointError, load_checkpoint


def pose_model_meta(stage, cfg, spec: KeypointSpec) -> dict:
    """What a checkpoint of ``stage`` (kdray.stages) must carry to be rebuilt without the
    experiment config."""
    return {"stage": stage.name, "kind": "refined" if stage.refined else "simcc",
            "model": to_dict(stage.model(cfg)), "dataset": cfg.data.dataset,
            "num_joints": spec.num_joints,
            "input_size": [int(v) for v in stage.input_size(cfg)],
            "split_ratio": cfg.data.split_ratio, "sigma": cfg.data.sigma,
            "padding": cfg.data.padding, "gcn_hidden": cfg.tsd.stage2.hidden}


META_FIELDS = ("kind", "model", "dataset", "num_joints", "input_size", "split_ratio", "sigma")


def check_meta(state: dict, source: str) -> dict:
    """The checkpoint's ``meta`` with every field rebuilding needs (``gcn_hidden`` too for a
    refined model), else a CheckpointError naming the file and the first missing field."""
    meta = state.get("meta")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: checkpoint field 'meta' is missing, so the network "
                              f"cannot be rebuilt (not a kdray pose-model checkpoint?)")
    needed = META_FIELDS + (("gcn_hidden",) if meta.get("kind") == "refined" else ())
    missing = [k for k in needed if k not in meta]
    if missing:
        raise CheckpointError(f"{source}: checkpoint field 'meta' is incomplete: missing "
                              f"{', '.join(repr(k) for k in missing)}")
    if meta["kind"] not in ("simcc", "refined"):
        raise CheckpointError(f"{source}: checkpoint field 'meta.kind': expected 'simcc' or "
                              f"'refined', got {meta['kind']!r}")
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{source}: checkpoint field 'model': expected a state dict")
    return meta


def model_from_state(state: dict, source: str = "<state>") -> tuple[nn.Module, dict]:
    meta = check_meta(state, source)
    try:
        spec = spec_for(meta["dataset"])
        size = tuple(meta["input_size"])
        model_cfg = from_dict(meta["model"], f"{source}: meta.model", cls=ModelConfig)
        # the checkpoint's weights replace the backbone's init: no ImageNet file is needed
        model_cfg = dataclasses.replace(model_cfg, weights="", pretrained=False)
        if meta["num_joints"] != spec.num_joints:
            raise ValueError(f"num_joints = {meta['num_joints']}, but {spec.name} has "
                             f"{spec.num_joints}")
        # sigma only shapes training targets; decoding reads the size and the split ratio
        codec = SimCCCodec(size, meta["split_ratio"], meta["sigma"])
        student = build_pose_model(model_cfg, codec, spec.flip_index())
    except (KeyError, TypeError, ValueError) as e:  # ConfigError (a ValueError) included
        raise CheckpointError(f"{source}: checkpoint field 'meta' does not describe a model "
                              f"kdray can build ({e})") from None
    weights = {k[len("model."):]: v for k, v in state["model"].items() if k.startswith("model.")}
    module: nn.Module = student
    if meta["kind"] == "refined":
        gcn = IGPGCN(spec.num_joints, spec.skeleton, gcn_feature_channels(student),
                     hidden=meta["gcn_hidden"])
        module = RefinedPoseModel(student, gcn)
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: weights do not match the model in 'meta' "
                              f"({str(e).splitlines()[0]})") from None
    return module.eval(), meta


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """(network in eval mode, meta) from a kdray checkpoint file or folder."""
    return model_from_state(load_checkpoint(path), str(path))


class Predictor:
    """Top-down inference on whole images: boxes -> crops -> network -> image keypoints."""

    def __init__(self, module: nn.Module, meta: dict, device: str = "cpu"):
        self.module, self.meta = module.to(device).eval(), meta
        self.device = torch.device(device)
        self.size = tuple(meta["input_size"])
        self.spec = spec_for(meta["dataset"])

    @torch.no_grad()
    def crops(self, images: torch.Tensor, flip_test: bool = True):
        """uint8 (B, 3, H, W) RGB crops at the input size -> coords (B, K, 2) in crop pixels,
        scores (B, K)."""
        return self.module.predict(normalize(images), flip_test)

    @torch.no_grad()
    def __call__(self, image_rgb: np.ndarray, boxes: np.ndarray, flip_test: bool = True):
        """image (H, W, 3) uint8 RGB, boxes (N, 4) xywh -> keypoints (N, K, 3): x, y, score."""
        crops, frames = crop_persons(image_rgb, boxes, self.meta)
        if not len(crops):
            return np.zeros((0, self.spec.num_joints, 3), np.float32)
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).to(self.device)
        coords, scores = self.crops(x, flip_test)
        crop_kp = torch.cat([coords.float(), scores.float()[..., None]], -1).cpu().numpy()
        return crops_to_image(crop_kp, frames, self.meta)


def crop_persons(image_rgb: np.ndarray, boxes: np.ndarray, meta: dict
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Whole image (H, W, 3) uint8 + person boxes (N, 4) xywh -> crops (N, h, w, 3) uint8 at the
    model's input size (what the registered pyfunc model takes) and frames (N, 4): each crop's
    centre and scale, for :func:`crops_to_image`. The evaluation crop (no rotation)."""
    import cv2
    h, w = (int(v) for v in meta["input_size"])
    crops, frames = [], []
    for box in np.asarray(boxes, np.float32).reshape(-1, 4):
        c, s = box_to_center_scale(box, w / h, meta.get("padding", 1.25))
        crops.append(cv2.warpAffine(np.ascontiguousarray(image_rgb), get_affine(c, s, 0.0, (h, w)),
                                    (w, h), flags=cv2.INTER_LINEAR))
        frames.append(np.concatenate([c, s]))
    if not crops:
        return np.zeros((0, h, w, 3), np.uint8), np.zeros((0, 4), np.float32)
    return np.stack(crops), np.stack(frames).astype(np.float32)


def crops_to_image(keypoints: np.ndarray, frames: np.ndarray, meta: dict) -> np.ndarray:
    """(N, K, 3) x, y in crop pixels + score -> the same in image pixels (inverse affine)."""
    kp = np.asarray(keypoints, np.float32)
    img = back_to_image(kp[..., :2], frames[:, :2], frames[:, 2:], tuple(meta["input_size"]))
    return np.concatenate([img, kp[..., 2:3]], -1).astype(np.float32)
