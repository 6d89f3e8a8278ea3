"""MLflow "model from code" for kdray pose networks (logged by kdray.orchestration.tracking).

MLflow records this file with the model instead of a pickle: loading runs this code and reads
the weights artifact (a kdray checkpoint: ``state_dict`` + ``meta``) with
``torch.load(weights_only=True)``, so nothing from the registry is unpickled.

``predict`` takes a batch of person crops, uint8 RGB ``(N, H, W, 3)`` at the model's input
size (``meta["input_size"]``), and returns keypoints ``(N, K, 3)`` float32: x, y in crop pixels
and a confidence score. Whole images with person boxes: crop them with the helpers the model
carries in its code (kdray/inference.py), then map the answer back to image pixels::

    model = mlflow.pyfunc.load_model("models:/kdray-tsd-student@champion")
    from kdray.inference import crop_persons, crops_to_image   # importable once it has loaded
    meta = model.unwrap_python_model().meta
    crops, frames = crop_persons(image_rgb, boxes_xywh, meta)  # (N, H, W, 3) uint8, (N, 4)
    keypoints = crops_to_image(model.predict(crops), frames, meta)  # (N, K, 3) image pixels

``kdray predict`` does the same (plus detector-box filtering and NMS, kdray/predict.py).
"""
from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

WEIGHTS = "weights"   # the artifact key that registry._log_pose_model uses


def keypoints_from_crops(module: torch.nn.Module, meta: dict, crops: np.ndarray,
                         flip_test: bool = True) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB crops -> (N, K, 3) float32 (x, y in crop pixels, score)."""
    from kdray.data.dataset import normalize

    crops = np.asarray(crops)
    size = tuple(meta["input_size"])
    if crops.ndim != 4 or crops.shape[1:] != (*size, 3):
        raise ValueError(f"expected crops of shape (N, {size[0]}, {size[1]}, 3), "
                         f"got {crops.shape}")
    images = normalize(torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2))
    coords, scores = module.predict(images, flip_test)   # either kind, its own codec
    return torch.cat([coords.float(), scores.float().unsqueeze(-1)], -1).numpy()


class PoseModel(PythonModel):
    """A kdray SimCC network (or student + IGP-GCN) behind the pyfunc interface."""

    # The signature is explicit (registry._log_pose_model): no type-hint validation. Without
    # this MLflow warns "Add type hints to the `predict` method" when the class is defined,
    # under its own warning filter (a filter of ours does not reach it).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from kdray.inference import model_from_checkpoint
        self.module, self.meta = model_from_checkpoint(context.artifacts[WEIGHTS])

    def predict(self, context, model_input, params=None):
        flip = bool((params or {}).get("flip_test", True))
        if isinstance(model_input, dict):       # a named tensor input arrives as {name: array}
            (model_input,) = model_input.values()
        return keypoints_from_crops(self.module, self.meta, np.asarray(model_input, np.uint8),
                                    flip)


mlflow.models.set_model(PoseModel())
