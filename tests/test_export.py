"""``kdray export``: the ONNX file gives the decoded keypoints PyTorch gives (onnxruntime)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import torch

from kdray.cli import main as kdray
from kdray.config import DataConfig
from kdray.data.coco import load_dataset
from kdray.data.dataset import PoseDataset
from kdray.export import Deployable
from kdray.inference import model_from_checkpoint

SIZE = (96, 64)


def test_onnx_keypoints_match_pytorch_on_real_crops(real_data, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "deploy" / "pose.onnx"
    assert kdray(["export", "--model", str(tiny_checkpoint), "--onnx", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["input"] == {"crops": ["batch", 3, *SIZE], "dtype": "uint8"}
    assert info["outputs"]["keypoints"] == ["batch", 17, 2]
    # the 12 non-crowd persons of the real COCO sample, cropped as in evaluation
    data = DataConfig(dataset="coco", root=str(real_data / "coco"), val_ann="test_coco.json",
                      image_dir=".", input_size=SIZE)
    records, spec = load_dataset(data, "val")
    ds = PoseDataset(records, spec, data, train=False)
    crops = torch.stack([ds[i]["image"] for i in range(len(ds))])   # uint8 (12, 3, 96, 64)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    keypoints, scores = session.run(None, {"crops": crops.numpy()})
    module, meta = model_from_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        ref_kp, ref_scores = Deployable(module, meta).eval()(crops)
    # argmax bins agree exactly (0.0 px measured); softmax peaks to fp32 rounding (~1e-7)
    assert keypoints.shape == (12, 17, 2)
    np.testing.assert_array_equal(keypoints, ref_kp.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=0, atol=1e-5)
    # the batch axis is dynamic: one crop alone gives the same answer
    one, _ = session.run(None, {"crops": crops[:1].numpy()})
    np.testing.assert_array_equal(one, keypoints[:1])
    # a name the exporter cannot write is the user's mistake: exit 2, nothing written
    assert kdray(["export", "--model", str(tiny_checkpoint), "--onnx",
                  str(tmp_path / "pose.txt")]) == 2
    assert "--onnx" in capsys.readouterr().err and not (tmp_path / "pose.txt").exists()
