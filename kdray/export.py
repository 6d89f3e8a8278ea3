"""``kdray export``: the deployable network as ONNX, SimCC decoding included.

The exported graph is the whole top-down step after cropping:

    input  ``crops``     uint8 (B, 3, H, W) RGB person crops at the model's input size
                         (``meta["input_size"]``; warp a box with kdray.inference's affine)
    output ``keypoints`` float32 (B, K, 2) x, y in crop pixels (argmax bin / k, docs/methods.md 1.2)
           ``scores``    float32 (B, K) min over the axes of the peak of softmax(10 * logits)

ImageNet normalisation and the argmax decode are inside; the batch axis is dynamic. One pass,
no flip test (the flip would double the cost; ``kdray test`` reports numbers with the flip test
the config asks for). A refined model (student + IGP-GCN) exports its refined pose. Mapping
back to image pixels is the inverse of the crop's affine (kdray.data.transforms.back_to_image).
Needs the ``export`` extra (onnx, onnxruntime, onnxscript).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdray.errors import InputError
from kdray.inference import Predictor

OPSET = 18


class Deployable(nn.Module):
    """uint8 crops (B, 3, H, W) -> keypoints (B, K, 2) crop pixels, scores (B, K)."""

    def __init__(self, module: nn.Module, meta: dict):
        super().__init__()
        self.predictor = Predictor(module, meta, "cpu")
        self.net = self.predictor.module      # registered: .eval() and parameters reach it

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coords, scores = self.predictor.crops(crops, flip_test=False)
        return coords.float(), scores.float()


def export_onnx(module: nn.Module, meta: dict, out: str | Path) -> dict:
    """Write ``out`` (ONNX, opset :data:`OPSET`); return what a deployer needs to know."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it; fail with the extra's name)
        import onnxscript  # noqa: F401
    except ImportError:
        raise InputError("--onnx: the ONNX exporter needs the export extra: "
                         "pip install -c constraints.txt -e '.[export]'") from None
    out = Path(out)
    if out.suffix != ".onnx":
        raise InputError(f"--onnx {out}: expected a file name ending in .onnx")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--onnx {out}: cannot create its folder ({e.strerror})") from None
    net = Deployable(module, meta).eval()
    h, w = (int(v) for v in meta["input_size"])
    example = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    from kdray.console import quiet_stdout
    with torch.no_grad(), quiet_stdout():    # the exporter's step-by-step progress lines
        program = torch.onnx.export(net, (example,), dynamo=True, opset_version=OPSET,
                                    input_names=["crops"], output_names=["keypoints", "scores"],
                                    dynamic_shapes={"crops": {0: batch}}, optimize=True,
                                    verbose=False)
    program.save(str(out), external_data=False)
    return {"onnx": str(out), "input": {"crops": ["batch", 3, h, w], "dtype": "uint8"},
            "outputs": {"keypoints": ["batch", int(meta["num_joints"]), 2],
                        "scores": ["batch", int(meta["num_joints"])]},
            "dataset": meta["dataset"], "kind": meta["kind"], "flip_test": False}
