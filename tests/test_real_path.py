"""The real-image path end to end on the real samples (tests/conftest.py ``real_data``):
reader, crop, SimCC targets, decode, back-transform and pycocotools agree on real files when a
tiny network memorises the COCO sample through ``kdray train`` and ``kdray test``; and what
``kdray test`` writes is what ``kdray eval`` scores, for COCO, CrowdPose and MPII."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdray.cli import main as kdray
from kdray.eval.coco import COCO_KEYS, CROWDPOSE_KEYS

NO_AUG = ["data.flip_prob=0", "data.rotation_prob=0", "data.half_body_prob=0",
          "data.scale_range=[1,1]", "data.num_workers=0"]
TINY = ["teacher.model.backbone=mobilenetv3_small_100", "teacher.train.batch_size=16"]
SAMPLES = {  # dataset -> folder, annotation file, detector boxes, metric, its keys
    "coco": ("coco", "test_coco.json", "test_coco_det_AP_H_56.json", "coco", COCO_KEYS),
    "crowdpose": ("crowdpose", "test_crowdpose.json", "test_crowdpose_det_AP_40.json",
                  "crowdpose", CROWDPOSE_KEYS),
    "mpii": ("mpii", "test_mpii.json", "", "pckh",
             ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean")),
}


def _data(real_data: Path, dataset: str) -> list[str]:
    folder, ann, _, _, _ = SAMPLES[dataset]
    return [f"data.dataset={dataset}", f"data.root={real_data / folder}",
            f"data.train_ann={ann}", f"data.val_ann={ann}", "data.image_dir=."]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _eval(capsys, real_data, dataset, results: Path) -> dict:
    folder, ann, _, metric, _ = SAMPLES[dataset]
    assert kdray(["eval", "--gt", str(real_data / folder / ann), "--pred", str(results),
                  "--metric", metric, "--json"]) == 0
    return _last_json(capsys)


@pytest.fixture(scope="module")
def memorised(real_data, tmp_path_factory):
    """mobilenetv3_small at 128x96 trained 40 epochs (lr 1e-2, no augmentation) on the COCO
    sample's persons; its val split is the same file. ~15 s on 2 CPU cores (AP 100)."""
    out = tmp_path_factory.mktemp("memorised")
    args = [*_data(real_data, "coco"), *NO_AUG, *TINY, "data.input_size=[128,96]",
            "teacher.train.epochs=40", "teacher.train.lr=1e-2", "teacher.train.flip_test=false",
            "teacher.train.eval_every=40"]
    assert kdray(["train", "--out", str(out / "train"), *args]) == 0
    return out, args


def test_memorising_the_coco_sample_reaches_ap_95(memorised, real_data, capsys):
    out, args = memorised
    capsys.readouterr()
    assert kdray(["test", "--model", str(out / "train" / "checkpoints" / "last.pt"),
                  "--out", str(out / "test"), *args]) == 0
    metrics = _last_json(capsys)
    assert metrics["AP"] >= 95.0, metrics
    # the training run's own evaluation saw the same numbers (one val loop, one evaluator)
    trained = json.loads((out / "train" / "metrics.json").read_text())["final"]
    assert {k: trained[f"val_{k}"] for k in COCO_KEYS} == {k: metrics[k] for k in COCO_KEYS}
    assert json.loads((out / "test" / "metrics.json").read_text()) == metrics
    assert _eval(capsys, real_data, "coco", out / "test" / "results.json") == \
        {k: metrics[k] for k in COCO_KEYS}


@pytest.mark.parametrize("dataset", ["crowdpose", "mpii"])
def test_results_file_scores_the_same_in_kdray_eval(dataset, real_data, tmp_path, capsys):
    """One epoch is enough: the point is that results.json and metrics.json agree. CrowdPose
    runs on its detector boxes (data.val_boxes), MPII writes PCKh joints in GT order."""
    _, _, boxes, _, keys = SAMPLES[dataset]
    args = [*_data(real_data, dataset), *NO_AUG, *TINY, "data.input_size=[64,48]",
            "teacher.train.epochs=1"] + ([f"data.val_boxes={boxes}"] if boxes else [])
    assert kdray(["train", "--out", str(tmp_path / "train"), *args]) == 0
    capsys.readouterr()
    assert kdray(["test", "--model", str(tmp_path / "train" / "checkpoints"),
                  "--out", str(tmp_path / "test"), *args]) == 0
    metrics = _last_json(capsys)
    results = json.loads((tmp_path / "test" / "results.json").read_text())
    n_boxes = len([d for d in json.loads((real_data / dataset / boxes).read_text())
                   if d["score"] >= 0]) if boxes else 5
    assert len(results) == n_boxes
    evaluated = _eval(capsys, real_data, dataset, tmp_path / "test" / "results.json")
    assert set(keys) <= set(evaluated) and evaluated == {k: metrics[k] for k in evaluated}
