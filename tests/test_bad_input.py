"""Bad input gets a clean error (issue 14, section 4): through the real entry points (``kdray``'s
``main`` and the pipelines' ``__main__`` blocks), each case below exits with code 2 and prints
ONE line naming the file, the record and the field (or the dotted config key), no traceback,
and fails before any compute. One case per finding of the malformed-input drill."""
from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest

from kdray.cli import main as kdray

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")


def _text(tmp, name, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def _json(tmp, name, data) -> str:
    return _text(tmp, name, json.dumps(data))


def _gt(real, mutate, metric="coco"):
    """(argv builder) kdray eval on a copy of the real GT with one field broken."""
    def build(tmp):
        gt = json.loads((real / "coco" / "test_coco.json").read_text())
        preds = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"],
                  "score": 1.0} for a in gt["annotations"]]
        gt_out, pred_out = mutate(gt, preds, tmp)
        return ["eval", "--gt", gt_out or _json(tmp, "gt.json", gt),
                "--pred", pred_out or _json(tmp, "pred.json", preds), "--metric", metric]
    return build


DROP = object()   # _set(..., DROP) deletes the field


def _set(path_fn, value):
    """mutate(): set one GT annotation field (``path_fn(gt)`` -> (record, key))."""
    def mutate(gt, preds, tmp):
        rec, key = path_fn(gt)
        if value is DROP:
            del rec[key]
        else:
            rec[key] = value
        return None, None
    return mutate


def _mpii_ragged(real):
    def build(tmp):
        gt = json.loads((real / "mpii" / "test_mpii.json").read_text())
        preds = [p["joints"] for p in gt]
        gt[2]["joints"][5] = [10.0]
        return ["eval", "--gt", _json(tmp, "gt.json", gt), "--pred",
                _json(tmp, "pred.json", preds), "--metric", "pckh"]
    return build


def _yaml(text: str | bytes, *argv):
    def build(tmp):
        path = tmp / "cfg.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["train", "--config", str(path), "--dry-run", *argv]
    return build


def _argv(*argv):
    return lambda tmp: [a.replace("TMP", str(tmp)) for a in argv]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real (untrained) kdray checkpoint: MobileNetV3-small at 64x64, COCO-17."""
    import torch

    from kdray.config import load_config
    from kdray.data.keypoints import spec_for
    from kdray.inference import pose_model_meta
    from kdray.stages import TEACHER
    cfg = load_config(None, ["data.input_size=[64, 64]",
                             "teacher.model.backbone=mobilenetv3_small_100"])
    model = TEACHER.pose_model(cfg, spec_for("coco"))
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    torch.save({"model": {f"model.{k}": v for k, v in model.state_dict().items()},
                "meta": pose_model_meta(TEACHER, cfg, spec_for("coco"))}, path)
    return path


def _predict(*extra, boxes=None, model=None):
    def build(tmp, real, ckpt):
        argv = ["predict", "--model", str(model(tmp) if model else ckpt),
                str(real / "coco" / "000000000785.jpg"), *extra]
        if boxes is not None:
            argv += ["--boxes", boxes(tmp)]
        return [a.replace("TMP", str(tmp)) for a in argv]
    return build


def _no_meta_field(tmp):
    import torch
    torch.save({"model": {}, "meta": {"kind": "simcc", "dataset": "coco"}}, tmp / "bad.pt")
    return tmp / "bad.pt"


def _truncated_synthpose(tmp):
    (tmp / "sp").mkdir()
    (tmp / "sp" / "train.json").write_text('{"images": [{"id": 1, "file_name": "a.jpg"')
    return ["train", "--config", SMOKE, "--out", str(tmp / "out"), f"data.root={tmp / 'sp'}"]


# (id, argv builder, what the one-line message must name)
KDRAY_CASES = [
    ("gt-missing-id", lambda r: _gt(r, _set(lambda g: (g["annotations"][3], "id"), DROP)),
     ["gt.json", "annotation #3", "field 'id'", "missing"]),
    ("gt-string-keypoints", lambda r: _gt(r, _set(lambda g: (g["annotations"][1], "keypoints"),
                                                  ["x"] * 51)),
     ["gt.json", "annotation #1 (id 198196)", "field 'keypoints'", "numbers"]),
    ("gt-string-bbox", lambda r: _gt(r, _set(lambda g: (g["annotations"][0], "bbox"), "1,2,3,4")),
     ["gt.json", "annotation #0 (id 442619)", "field 'bbox'"]),
    ("gt-nan-keypoint", lambda r: _gt(r, _set(lambda g: (g["annotations"][2], "keypoints"),
                                              [math.nan] * 51)),
     ["gt.json", "annotation #2", "field 'keypoints'", "NaN"]),
    ("gt-directory", lambda r: _gt(r, lambda g, p, t: (str(t), None)),
     ["field '(path)'", "is a directory"]),
    ("pred-directory", lambda r: _gt(r, lambda g, p, t: (None, str(t))),
     ["field '(path)'", "is a directory"]),
    ("pred-category-list", lambda r: _gt(r, lambda g, p, t: (None, _json(
        t, "pred.json", [{**d, "category_id": [1]} for d in p]))),
     ["pred.json", "result #0", "field 'category_id'", "expected an integer"]),
    ("pred-category-unknown", lambda r: _gt(r, lambda g, p, t: (None, _json(
        t, "pred.json", [{**d, "category_id": 7} for d in p]))),
     ["pred.json", "result #0", "field 'category_id'", "category 7"]),
    ("mpii-ragged-joints", _mpii_ragged, ["gt.json", "person #2", "field 'joints'"]),
    ("config-yaml-list", lambda r: _yaml("- a\n- b\n", "a.b=1"), ["cfg.yaml", "mapping"]),
    ("config-directory", lambda r: lambda t: ["train", "--config", str(t), "--dry-run"],
     ["is a directory"]),
    ("config-binary", lambda r: _yaml(bytes(range(256))), ["cfg.yaml", "UTF-8"]),
    ("config-duplicate-key", lambda r: _yaml("teacher:\n  train: {lr: 0.1}\n  train: {}\n"),
     ["cfg.yaml", "teacher.train", "twice", "lines 2 and 3"]),
    ("hrnet-64x48", lambda r: _argv("train", "--dry-run", "data.input_size=[64, 48]"),
     ["data.input_size", "hrnet_w18_small", "divisible by 32"]),
    ("cdkd-low-res-32x24", lambda r: _argv("train", "--dry-run", "--stage", "cdkd",
                                           "cdkd.low_res_size=[32, 24]"),
     ["cdkd.low_res_size: (32, 24)", "cdkd.student.model.backbone"]),
    ("unknown-backbone", lambda r: _argv("train", "--dry-run", "student.model.backbone=vit"),
     ["student.model.backbone", "'vit'", "known: hrnet_w18_small"]),
    ("missing-weights", lambda r: _argv("train", "--dry-run", "teacher.model.weights=TMP/w.pt"),
     ["teacher.model.weights", "w.pt", "no such file"]),
    ("weight-decay-inf", lambda r: _argv("train", "--dry-run", "teacher.train.weight_decay=.inf"),
     ["teacher.train.weight_decay", "finite"]),
    ("student-without-teacher", lambda r: _argv("train", "--stage", "student", "--config", SMOKE,
                                                "--out", "TMP/out"),
     ["--stage student needs --teacher"]),
    ("gcn-without-student", lambda r: _argv("train", "--stage", "gcn", "--config", SMOKE,
                                            "--teacher", "TMP/t.pt", "--out", "TMP/out"),
     ["--stage gcn needs --student"]),
    ("synthpose-truncated", lambda r: _truncated_synthpose, ["train.json", "invalid JSON"]),
    ("registry-list-no-store", lambda r: _argv("registry", "list"), ["TMP/mlflow.db",
                                                                     "MLFLOW_TRACKING_URI"]),
    ("registry-show-no-store", lambda r: _argv("registry", "show", "kdray-teacher@champion"),
     ["TMP/mlflow.db", "no MLflow store"]),
]

PREDICT_CASES = [
    ("meta-incomplete", _predict("--out", "TMP/p.png", model=_no_meta_field),
     ["bad.pt", "'meta'", "'input_size'"]),
    ("boxes-missing", _predict("--out", "TMP/p.png", boxes=lambda t: str(t / "none.json")),
     ["none.json", "file not found"]),
    ("boxes-not-json", _predict("--out", "TMP/p.png", boxes=lambda t: _text(t, "x.json", "{oops")),
     ["x.json", "invalid JSON"]),
    ("boxes-3-numbers", _predict("--out", "TMP/p.png", boxes=lambda t: _json(
        t, "d.json", [{"image_id": 785, "bbox": [1, 2, 30, 40]}, {"image_id": 785,
                                                                  "bbox": [1, 2, 3]}])),
     ["d.json", "detection #1", "field 'bbox'", "expected 4 numbers"]),
    ("out-extension", _predict("--out", "TMP/pose.txt"), ["--out", "pose.txt", "extension"]),
    ("out-unwritable", _predict("--out", "/proc/x.png"), ["/proc/x.png", "could not write"]),
]


def _assert_clean(rc, captured, prog, tmp_path, fragments):
    err = captured.err
    assert rc == 2, (rc, captured.out, err)
    assert "Traceback" not in err + captured.out, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, err
    for text in fragments:
        assert text.replace("TMP", str(tmp_path)) in lines[0], (text, lines[0])


@pytest.mark.parametrize("case,build,fragments", KDRAY_CASES, ids=[c[0] for c in KDRAY_CASES])
def test_kdray_bad_input(case, build, fragments, tmp_path, real_data, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KDRAY_STORAGE", str(tmp_path))
    rc = kdray(build(real_data)(tmp_path))
    _assert_clean(rc, capsys.readouterr(), "kdray", tmp_path, fragments)
    assert not (tmp_path / "mlflow.db").exists()      # reading the registry creates nothing
    assert not (tmp_path / "out" / "checkpoints").exists()   # failed before training


@pytest.mark.parametrize("case,build,fragments", PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_predict_bad_input(case, build, fragments, tmp_path, real_data, checkpoint, capsys):
    rc = kdray(build(tmp_path, real_data, checkpoint))
    _assert_clean(rc, capsys.readouterr(), "kdray", tmp_path, fragments)
    assert not (tmp_path / "pose.txt").exists()


def _space(text):
    def build(tmp):
        (tmp / "space.yaml").write_text(text)
        return [str(tmp / "space.yaml"), "--config", SMOKE]
    return build


REAL_COCO = [f"data.root={Path(__file__).resolve().parents[2] / 'shared/data/real/coco'}",
             "data.dataset=coco", "data.train_ann=test_coco.json",
             "data.val_ann=test_coco.json", "data.image_dir=."]

PIPELINE_CASES = [
    ("two_stage", "config-directory", lambda t: ["--config", str(t)], ["is a directory"]),
    ("cdkd", "cdkd-low-res", lambda t: ["--config", SMOKE, "cdkd.low_res_size=[40, 32]"],
     ["cdkd.low_res_size: (40, 32)", "divisible by 16"]),
    ("ablation", "config-duplicate-key",
     lambda t: ["--table", "tsd-iv", "--config", _text(t, "cfg.yaml", "data: {}\ndata: {}\n")],
     ["cfg.yaml", "data: key given twice"]),
    ("two_stage", "transfer-sets-differ",   # refused by Stage.check before any stage runs
     lambda t: ["--config", SMOKE, "student.train.labelled=10"],
     ["tsd.stage2.train.labelled = 0 differs from student.train.labelled = 10", "set both"]),
    ("two_stage", "missing-teacher-inside-pipeline",
     lambda t: ["--config", SMOKE, "--teacher", str(t / "none.pt"), *REAL_COCO],
     ["none.pt", "checkpoint file not found"]),
    ("sweep", "space-uniform-on-int", _space("stage: cdkd\nparams:\n"
                                             "  cdkd.projectors: {uniform: [1, 5]}\n"),
     ["space.yaml", "cdkd.projectors", "integer", "use int"]),
    ("sweep", "space-unknown-metric", _space("stage: student\nmetric: AP\nparams:\n"
                                             "  tsd.stage1.alpha: {uniform: [0, 1]}\n"),
     ["space.yaml", "metric: 'AP'", "val_AP"]),
    ("sweep", "space-bad-when", _space("stage: cdkd\nparams:\n  cdkd.sau: {choice: [true, false]}\n"
                                       "  cdkd.sau_kernels: {choice: [1-1-2-0], when: "
                                       "{cdkd.sau: yes_please}}\n"),
     ["space.yaml", "cdkd.sau_kernels: when: cdkd.sau", "yes_please"]),
    ("sweep", "space-duplicate-key", _space("stage: cdkd\nparams:\n"
                                            "  cdkd.alpha: {uniform: [0, 1]}\n"
                                            "  cdkd.alpha: {uniform: [1, 2]}\n"),
     ["space.yaml", "params.cdkd.alpha: key given twice"]),
    ("sweep", "space-directory", lambda t: [str(t), "--config", SMOKE], ["is a directory"]),
]


@pytest.mark.parametrize("script,case,build,fragments", PIPELINE_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in PIPELINE_CASES])
def test_pipeline_bad_input(script, case, build, fragments, tmp_path, capsys, monkeypatch):
    """The script's own ``__main__`` block, in-process."""
    path = REPO / "pipelines" / f"{script}.py"
    argv = build(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(path), *argv, "--storage", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(path), run_name="__main__")
    _assert_clean(exit_.value.code, capsys.readouterr(), f"pipelines/{script}.py", tmp_path,
                  fragments)


def test_run_main_unwraps_a_worker_error_and_keeps_bugs_loud(capsys):
    """A ConfigError raised on a Ray worker comes back as RayTaskError(ConfigError), whose text
    is the remote traceback: the one line printed is the original message. A bug is re-raised."""
    from ray.exceptions import RayTaskError

    from kdray.config import ConfigError
    from kdray.errors import run_main

    def worker_fails(argv):
        try:
            raise ConfigError("c.yaml: cdkd.alpha: expected a value >= 0.0, got -1.0")
        except ConfigError as e:
            raise RayTaskError("fit", "Traceback (remote) ...", e).as_instanceof_cause() from None

    assert run_main(worker_fails, [], "pipelines/x.py") == 2
    assert capsys.readouterr().err == ("pipelines/x.py: error: c.yaml: cdkd.alpha: expected a "
                                       "value >= 0.0, got -1.0\n")
    assert run_main(lambda argv: {"metrics": {}}) == 0          # a pipeline's summary dict
    with pytest.raises(ZeroDivisionError):
        run_main(lambda argv: 1 / 0)
