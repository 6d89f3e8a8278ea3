"""The pyfunc model on a whole image with boxes, in a Python that cannot import the repo's
kdray: the crop helpers it carries give the image coordinates ``kdray predict`` gives."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import mlflow
import numpy as np

from kdray.inference import Predictor, model_from_checkpoint
from kdray.orchestration import pyfunc_model

REPO = Path(__file__).resolve().parents[2]
BOXES = [[377.0, 173.0, 261.0, 216.0], [164.0, 80.0, 200.0, 259.0]]

SCRIPT = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path[:] = [p for p in sys.path if p and p.rstrip("/") != {repo!r}]
try:
    import kdray
    raise SystemExit("kdray is still importable: " + kdray.__file__)
except ImportError:
    pass
import cv2, mlflow, numpy as np
model = mlflow.pyfunc.load_model({model!r})
from kdray.inference import crop_persons, crops_to_image   # the model's own copy of kdray
meta = model.unwrap_python_model().meta
image = cv2.cvtColor(cv2.imread({image!r}), cv2.COLOR_BGR2RGB)
crops, frames = crop_persons(image, np.array({boxes!r}, np.float32), meta)
print(json.dumps(crops_to_image(model.predict(crops), frames, meta).tolist()))
"""


def test_whole_image_with_boxes_in_a_fresh_environment(real_data, tiny_checkpoint, tmp_path):
    path = tmp_path / "model"
    mlflow.pyfunc.save_model(str(path), python_model=pyfunc_model.__file__,
                             artifacts={pyfunc_model.WEIGHTS: str(tiny_checkpoint)},
                             code_paths=[str(REPO / "kdray")])
    image = real_data / "coco" / "000000197388.jpg"
    script = SCRIPT.format(repo=str(REPO), model=str(path), image=str(image), boxes=BOXES)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.asarray(json.loads(proc.stdout.strip().splitlines()[-1]), np.float32)
    module, meta = model_from_checkpoint(tiny_checkpoint)
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    expected = Predictor(module, meta)(rgb, np.asarray(BOXES, np.float32))
    assert got.shape == (2, 17, 3)
    # image pixels inside each box's padded crop, and the same numbers as kdray predict's path
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert (got[0, :, 0] > 377 - 0.3 * 261).all() and (got[0, :, 0] < 377 + 1.3 * 261).all()
