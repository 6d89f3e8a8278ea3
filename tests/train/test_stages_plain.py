"""Teacher -> TSD stage 1 -> stage 2 and teacher -> CDKD, end to end in plain Python (no Ray)."""
import json

import pytest
import torch

from kdray.cli import main as kdray
from kdray.eval.complexity import complexity
from kdray.inference import model_from_checkpoint
from kdray.nn.pose_model import build_pose_model
from kdray.stage_run import build_stage, load_records, run_stage

from ..conftest import assert_poses_drawn


def test_tsd_chain_end_to_end(tiny_cfg, tmp_path, real_data, capsys):
    records = load_records(tiny_cfg)
    teacher = run_stage("teacher", tiny_cfg, tmp_path / "teacher", records=records)
    student = run_stage("student", tiny_cfg, tmp_path / "student",
                        {"teacher": str(teacher.checkpoint)}, records=records)
    for key in ("loss_kl", "loss_fea", "loss_pose", "loss_cst"):   # each term logged
        assert key in student.history[-1]
    inputs = {"teacher": str(teacher.checkpoint), "student": str(student.checkpoint)}

    # stage 2: the student is frozen, only the GCN learns
    built = build_stage("gcn", tiny_cfg, inputs, records)
    frozen = {k: v.clone() for k, v in built.task.model.student.state_dict().items()}
    gcn0 = {k: v.clone() for k, v in built.task.model.gcn.state_dict().items()}
    from kdray.train import fit
    result = fit(built.task, built.train_loader, built.train_cfg, tmp_path / "gcn",
                 built.evaluate)
    assert all(torch.equal(frozen[k], v) for k, v in built.task.model.student.state_dict().items())
    assert any(not torch.equal(gcn0[k], v) for k, v in built.task.model.gcn.state_dict().items())
    trainable = {id(p) for p in built.task.trainable_parameters()}
    assert trainable == {id(p) for p in built.task.model.gcn.parameters()}
    assert {"val_AP", "val_err_occluded", "loss_gcn1", "loss_gcn3"} <= set(result.metrics)

    # the refined model (student + GCN) is one module that `kdray predict` runs
    module, meta = model_from_checkpoint(tmp_path / "gcn" / "checkpoints" / "last.pt")
    assert meta["kind"] == "refined"
    image = real_data / "coco" / "000000196141.jpg"
    out = tmp_path / "pose.png"
    capsys.readouterr()
    assert kdray(["predict", "--model", str(tmp_path / "gcn" / "checkpoints" / "last.pt"),
                  str(image), "--boxes", str(real_data / "coco" / "test_coco_det_AP_H_56.json"),
                  "--out", str(out)]) == 0
    assert_poses_drawn(image, out, json.loads(capsys.readouterr().out))


def test_cdkd_end_to_end(tiny_cfg, tmp_path):
    records = load_records(tiny_cfg)
    teacher = run_stage("teacher", tiny_cfg, tmp_path / "teacher", records=records)
    res = run_stage("cdkd", tiny_cfg, tmp_path / "cdkd", {"teacher": str(teacher.checkpoint)},
                    records=records)
    last = res.history[-1]
    assert {"loss_ori", "loss_fea", "loss_logit", "tau", "val_AP"} <= set(last)
    assert 1.0 <= last["tau"] <= 10.0
    module, meta = model_from_checkpoint(res.checkpoint)
    assert meta["input_size"] == list(tiny_cfg.cdkd.low_res_size)


def test_train_cli_writes_outputs_and_dry_run(tiny_cfg, tmp_path, capsys, synth_root):
    cfg_file = tmp_path / "c.yaml"
    from kdray.config import dump_yaml
    dump_yaml(tiny_cfg, cfg_file)
    assert kdray(["train", "--config", str(cfg_file), "--out", str(tmp_path / "t"),
                  "teacher.train.epochs=1"]) == 0
    for name in ("metrics.json", "config.yaml", "loss_curve.png", "checkpoints/last.pt"):
        assert (tmp_path / "t" / name).exists(), name
    capsys.readouterr()
    assert kdray(["train", "--config", str(cfg_file), "--dry-run"]) == 0
    info = json.loads(capsys.readouterr().out)
    # the teacher's network at the teacher's input size: the model the stage would train
    model = build_pose_model(tiny_cfg.teacher.model, 17, tiny_cfg.data.input_size,
                             tiny_cfg.data.split_ratio)
    assert info["stage"] == "teacher" and info["input_size"] == list(tiny_cfg.data.input_size)
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["gflops"] == pytest.approx(complexity(model, tiny_cfg.data.input_size)["gflops"])
    # a bad override fails before any compute, naming the key
    assert kdray(["train", "--config", str(cfg_file), "teacher.train.epochs=zero"]) == 2
    assert "teacher.train.epochs" in capsys.readouterr().err
