"""The two-stage pipeline end to end on a real local Ray and a real MLflow store.

One scenario, checked by several tests (a pipeline run is the expensive part):

1. ``python pipelines/two_stage.py`` in a subprocess; its stage-1 worker hangs at epoch 2
   (after epoch 1's checkpoint went to Ray) and the driver is killed (SIGKILL);
2. the same command again (in this process): it reuses the finished teacher and resumes
   stage 1, then finishes, prints its summary line and registers the models;
3. the same command a third time: every stage is reused and no model version is added.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from kdray.config import load_config, with_overrides
from kdray.orchestration import pipeline, ray_train
from kdray.stages import TEACHER, TSD_REFINED, TSD_STUDENT

from ..conftest import assert_poses_drawn
from .conftest import FAST, REPO, SMOKE, fault_env, load_script, run_then_kill

SCRIPT = REPO / "pipelines" / "two_stage.py"


def _two_stage():
    return load_script(SCRIPT, "two_stage_pipeline")


def _run_in_process(argv: list[str]) -> tuple[dict, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        summary = _two_stage().main(argv)
    return summary, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, smoke_data, ray_local):
    storage = tmp_path_factory.mktemp("two_stage")
    argv = ["--config", str(SMOKE), "--storage", str(storage), *FAST,
            f"data.root={smoke_data}", "student.train.epochs=2"]
    cfg = pipeline.resolve_config(load_config(SMOKE, argv[4:]), storage)
    teacher_key = pipeline.stage_key(TEACHER, cfg, {})
    stage1_key = pipeline.stage_key(TSD_STUDENT, cfg, {"teacher": teacher_key})
    cache = storage / "runs" / "stages"

    # 1. The driver, killed while its stage-1 worker waits at epoch 2.
    marker = storage / "hang.marker"
    run_then_kill(SCRIPT, argv, storage, storage / "killed_driver.log", marker.exists, 400,
                  "stage 1 never reached epoch 2",
                  env=fault_env(epoch=2, marker=marker, action="hang", stage="student"))
    teacher_marker = cache / f"teacher-{teacher_key}" / "stage.json"
    killed = {"teacher_mtime": teacher_marker.stat().st_mtime_ns,
              "teacher_attempts": ray_train.read_attempts(teacher_marker.parent),
              "stage1_done": (cache / f"student-{stage1_key}" / "stage.json").exists()}

    # 2. The same command again, then 3. once more.
    second = _run_in_process(argv)
    saved = json.loads((storage / "runs" / "two_stage" / "summary.json").read_text())
    third = _run_in_process(argv)
    return {"storage": storage, "cache": cache, "argv": argv, "killed": killed,
            "teacher_dir": teacher_marker.parent, "stage1_dir": cache / f"student-{stage1_key}",
            "second": second, "saved": saved, "third": third,
            "uri": second[0]["outputs"]["mlflow_uri"]}


def test_driver_killed_in_stage1_rerun_reuses_teacher_and_resumes(scenario):
    killed, (summary, _, err) = scenario["killed"], scenario["second"]
    assert not killed["stage1_done"], "stage 1 had finished before the driver was killed"
    # The teacher was not trained again: same marker file, one training attempt, log says so.
    teacher_marker = scenario["teacher_dir"] / "stage.json"
    assert teacher_marker.stat().st_mtime_ns == killed["teacher_mtime"]
    assert ray_train.read_attempts(scenario["teacher_dir"]) == killed["teacher_attempts"]
    assert len(killed["teacher_attempts"]) == 1
    assert "teacher: reused finished stage teacher" in err
    assert summary["metrics"]["reused_teacher"] == 1.0
    # Stage 1 resumed from Ray's epoch-1 checkpoint instead of starting over.
    starts = [a["start_epoch"] for a in ray_train.read_attempts(scenario["stage1_dir"])]
    assert starts == [1, 2], starts
    assert "stage1: resuming stage student" in err
    history = json.loads((scenario["stage1_dir"] / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_pipeline_prints_summary_and_writes_summary_json(scenario):
    summary, stdout, _ = scenario["second"]
    line = [x for x in stdout.splitlines() if x.startswith("{")][-1]
    assert json.loads(line) == summary
    assert scenario["saved"] == summary                    # runs/two_stage/summary.json
    assert summary["pipeline"] == "two_stage" and summary["mlflow_run_id"]
    m = summary["metrics"]
    for k in ("AP_teacher", "AP_baseline", "AP_stage1", "AP_stage2", "err_occluded_stage1",
              "err_occluded_stage2", "seconds_teacher", "seconds_stage1", "seconds_stage2",
              "seconds_baseline"):
        assert isinstance(m[k], float), k
    assert set(summary["outputs"]["stages"]) == {"teacher", "stage1", "stage2", "baseline"}


def test_pipeline_says_up_front_how_long_it_expects_to_take(scenario):
    err = scenario["second"][2]
    first = err.index("[kdray] two_stage: expected ~")
    assert first < err.index("stage 1/4")                          # before any stage
    line = err[first:].splitlines()[0]
    for part in ("teacher ~", "student ~", "gcn ~", "a stage already in the cache"):
        assert part in line, line
    finished = [x for x in err.splitlines() if "two_stage finished in" in x]
    assert len(finished) == 1 and "(expected ~" in finished[0]


def test_mlflow_holds_parent_child_runs_metrics_artifacts_and_models(scenario):
    from mlflow.tracking import MlflowClient
    summary, uri = scenario["second"][0], scenario["uri"]
    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["student.model.backbone"] == "mobilenetv3_small_100"
    assert "AP_stage2" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_label = {r.data.tags["kdray.label"]: r for r in children}
    assert set(by_label) == {"teacher", "stage1", "stage2", "baseline"}
    assert by_label["teacher"].data.tags["kdray.reused"] == "true"
    stage1 = by_label["stage1"]
    assert stage1.info.status == "FINISHED"
    smoke = load_config(SMOKE, scenario["argv"][4:])     # the config the scenario ran
    assert float(stage1.data.params["tsd.stage1.alpha"]) == smoke.tsd.stage1.alpha
    steps = {m.step for m in client.get_metric_history(stage1.info.run_id, "train/loss_fea")}
    assert steps == {1, 2}                                 # per epoch, step = epoch
    for key in ("train/loss", "train/lr", "train/throughput", "val/AP"):
        assert key in stage1.data.metrics, key
    assert "epoch" not in stage1.data.metrics              # the step, not a metric
    # Runs say where they came from (what MLflow's fluent API would have set).
    import subprocess
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    for run in (parent, stage1):
        assert run.data.tags["mlflow.source.git.commit"] == commit
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    assert "kdray" in client.get_experiment(parent.info.experiment_id).tags["mlflow.note.content"]
    names = {a.path for a in client.list_artifacts(stage1.info.run_id)}
    assert {"config.yaml", "loss_curve.png", "poses.png", "metrics.json"} <= names
    # Registered, with aliases, and loadable as a pyfunc that takes crops.
    for kind in (TEACHER, TSD_STUDENT, TSD_REFINED):
        name = kind.model_name
        mv = client.get_model_version_by_alias(name, "champion")
        assert client.get_model_version_by_alias(name, "candidate").version == mv.version
        assert mv.tags["stage_key"] and mv.tags["val_set"] and mv.tags["metric"] == "val_AP"
        assert mv.tags["stage_key"] in mv.description and "synthpose" in mv.description
        assert client.get_registered_model(name).description == kind.description
    import mlflow
    import numpy as np
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/kdray-tsd-refined@champion")
    crops = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    got = model.predict(crops)
    # the registered weights, loaded the way `kdray predict models:/...` loads them
    from kdray.orchestration import registry
    from kdray.orchestration.pyfunc_model import keypoints_from_crops
    module, meta = registry.load_registered("models:/kdray-tsd-refined@champion", uri)
    np.testing.assert_array_equal(got, keypoints_from_crops(module, meta, crops))
    assert got.shape == (2, 17, 3) and (got[..., :2] >= 0).all() and (got[..., :2] < 64).all()
    assert ((got[..., 2] > 0) & (got[..., 2] <= 1)).all()      # x, y in the crop; a probability


def test_predict_and_registry_cli_from_models_uri(scenario, real_data, tmp_path, monkeypatch,
                                                   capsys):
    from kdray import cli
    monkeypatch.setenv("MLFLOW_TRACKING_URI", scenario["uri"])
    out = tmp_path / "pose.png"
    image = real_data / "coco" / "000000000785.jpg"
    assert cli.main(["predict", "--model", "models:/kdray-tsd-refined@champion", str(image),
                     "--out", str(out)]) == 0
    assert_poses_drawn(image, out, json.loads(capsys.readouterr().out))
    assert cli.main(["registry", "list"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"kdray-teacher", "kdray-tsd-student", "kdray-tsd-refined"}
    assert listed["kdray-tsd-refined"]["aliases"] == {"candidate": 1, "champion": 1}
    assert cli.main(["registry", "show", "kdray-tsd-refined@champion"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["aliases"] == ["candidate", "champion"] and shown["version"] in (1, "1")
    assert cli.main(["registry", "show", "kdray-tsd-refined@nope"]) == 2

    # "what is this checkpoint's AP": kdray test on the registered stage-1 student gives the
    # val AP the pipeline reported for it (same val loop and evaluator)
    capsys.readouterr()
    assert cli.main(["test", "--model", "models:/kdray-tsd-student@champion", "--config",
                     str(SMOKE), "--out", str(tmp_path / "test"), *scenario["argv"][4:]]) == 0
    tested = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tested["AP"] == pytest.approx(scenario["saved"]["metrics"]["AP_stage1"], abs=1e-6)
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["AP"] == tested["AP"]
    # and the registered student exports to ONNX from its models:/ reference
    assert cli.main(["export", "--model", "models:/kdray-tsd-student@champion", "--onnx",
                     str(tmp_path / "student.onnx")]) == 0
    import onnx
    graph = onnx.load(str(tmp_path / "student.onnx")).graph
    assert [o.name for o in graph.output] == ["keypoints", "scores"]


def test_third_run_reuses_every_stage_and_adds_no_version(scenario):
    summary, _, err = scenario["third"]
    assert all(summary["metrics"][f"reused_{k}"] == 1.0
               for k in ("teacher", "stage1", "stage2", "baseline"))
    assert err.count("reused finished stage") == 4
    assert summary["outputs"]["models"] == scenario["second"][0]["outputs"]["models"]
    assert summary["metrics"]["AP_stage2"] == scenario["second"][0]["metrics"]["AP_stage2"]


def test_stage_keys_depend_only_on_what_the_stage_uses():
    cfg = load_config(SMOKE)
    other_tsd = with_overrides(cfg, {"tsd.stage1.alpha": 1.0, "tsd.stage2.hidden": 8,
                                              "cdkd.projectors": 2, "ray.num_workers": 2,
                                              "data.num_workers": 1, "tracking.experiment": "x"})
    key = pipeline.stage_key
    assert key(TEACHER, cfg, {}) == key(TEACHER, other_tsd, {})
    base = pipeline.baseline_config(cfg)
    assert TSD_STUDENT.inputs(base) == ()
    assert key(TSD_STUDENT, base, {}) == key(TSD_STUDENT, pipeline.baseline_config(other_tsd), {})
    assert key(TSD_STUDENT, cfg, {"teacher": "a"}) != key(TSD_STUDENT, cfg, {"teacher": "b"})
    assert key(TSD_STUDENT, cfg, {"teacher": "a"}) != key(TSD_STUDENT, other_tsd, {"teacher": "a"})
    assert key(TEACHER, cfg, {}) != key(TEACHER, with_overrides(
        cfg, {"teacher.train.lr": 1e-4}), {})


def test_killed_runs_are_closed_and_registration_keeps_end_times(scenario):
    """The killed driver's parent and stage-1 runs were closed by the rerun (KILLED, tagged);
    registering models afterwards did not reopen the finished stage runs."""
    from mlflow.tracking import MlflowClient
    summary, uri = scenario["second"][0], scenario["uri"]
    client = MlflowClient(uri)
    exp = client.get_run(summary["mlflow_run_id"]).info.experiment_id
    parents = client.search_runs([exp], "tags.`kdray.pipeline` = 'two_stage'",
                                 order_by=["attributes.start_time ASC"])
    killed = parents[0]
    assert killed.info.run_id != summary["mlflow_run_id"]
    assert killed.info.status == "KILLED" and killed.data.tags["kdray.orphaned"] == "true"
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{killed.info.run_id}'")
    by_label = {r.data.tags["kdray.label"]: r for r in children}
    assert by_label["teacher"].info.status == "FINISHED"      # it had finished before the kill
    assert by_label["stage1"].info.status == "KILLED"
    assert by_label["stage1"].data.tags["kdray.orphaned"] == "true"
    assert not [r for r in client.search_runs([exp]) if r.info.status == "RUNNING"]
    # Models are registered after every stage ran: a stage run's end time must still be its own.
    second = {r.data.tags["kdray.label"]: r for r in client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")}
    assert second["stage1"].info.end_time <= second["stage2"].info.start_time
    assert second["stage2"].info.end_time <= second["baseline"].info.start_time


def test_registered_model_carries_kdray_and_loads_without_it(scenario, tmp_path):
    """The pyfunc model lists its requirements and carries kdray's code: a Python that cannot
    import the installed kdray still loads and runs it."""
    import subprocess
    import sys

    import mlflow
    mlflow.set_tracking_uri(scenario["uri"])
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri="models:/kdray-tsd-student@champion", dst_path=str(tmp_path / "m")))
    reqs = (local / "requirements.txt").read_text().split()
    for pkg in ("torch", "timm", "numpy", "opencv-python-headless", "mlflow"):
        assert any(r.startswith(f"{pkg}==") for r in reqs), (pkg, reqs)
    assert (local / "code" / "kdray" / "nn" / "pose_model.py").is_file()
    script = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path[:] = [p for p in sys.path if p and p.rstrip("/") != {str(REPO)!r}]
try:
    import kdray
    raise SystemExit("kdray is still importable: " + kdray.__file__)
except ImportError:
    pass
import mlflow, numpy as np
mlflow.set_tracking_uri({scenario["uri"]!r})
model = mlflow.pyfunc.load_model("models:/kdray-tsd-student@champion")
print(model.predict(np.zeros((1, 64, 64, 3), np.uint8)).shape)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "(1, 17, 3)"
