"""Search spaces and sweeps: validation before any trial, Optuna define-by-run, and a real sweep
(local Ray with 2 CPUs, Optuna, MLflow in a temp dir) killed after its first finished trial and
resumed with --resume.

How the resume test sees that the finished trial is not rerun: every start of a trial function
appends a line to ``<out>/trials/<trial_id>/attempts.jsonl``; the trial that had finished
before the kill still has exactly one line after the resumed sweep.

The swept space is search_spaces/cdkd.yaml plus a learning-rate grid of 3e-3 and 0 (a trial
that cannot learn), minimising the visible-joint error over 3 epochs: ASHA stops the lr-0
trial at epoch 1 or 2 (smoke AP ties at 0 and would stop none). Trials run one at a time: the
grid's first point finishes before the kill, so when the lr-0 trial that follows starts after
the kill, it is stopped only if the resumed sweep's ASHA remembers the first
(tune.ResumableASHA). If the kill catches it after its epoch-1 checkpoint, it resumes at epoch
2, still a rung below the last epoch (3), which ASHA never stops. Later trials (TPE's) may or
may not be stopped: they are not asserted.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import optuna
import pytest
import yaml

from kdray.config import ConfigError, load_config
from kdray.orchestration.search_space import (define_by_run, load_space, make_sampler,
                                               metric_mode)

from .conftest import FAST, REPO, SMOKE, load_script, run_then_kill

SCRIPT = REPO / "pipelines" / "sweep.py"


def _space(tmp_path, params, stage="cdkd") -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"stage": stage, "params": params}))
    return path


@pytest.mark.parametrize("name", ["tsd_stage1", "tsd_stage2", "cdkd"])
def test_shipped_spaces_are_valid(name):
    space = load_space(REPO / "search_spaces" / f"{name}.yaml", load_config(SMOKE))
    assert space.params and space.stage.name in ("student", "gcn", "cdkd")


@pytest.mark.parametrize("params, message", [
    ({"cdkd.nope": {"uniform": [0, 1]}}, "cdkd.nope: unknown config field"),
    ({"cdkd": {"uniform": [0, 1]}}, "cdkd: is a config section"),
    ({"cdkd.alpha": {"normal": [0, 1]}}, "cdkd.alpha: expected exactly one distribution"),
    ({"cdkd.alpha": {"uniform": [2.0, 1.0]}}, "cdkd.alpha: uniform: expected low < high"),
    ({"cdkd.alpha": {"loguniform": [0.0, 1.0]}}, "cdkd.alpha: loguniform: expected low > 0"),
    ({"cdkd.projectors": {"int": [1, 9]}}, "cdkd.projectors: value 9 is refused"),
    ({"cdkd.projectors": {"uniform": [1.0, 3.0]}}, "cdkd.projectors: uniform: the field is an "
                                                   "integer"),
    ({"cdkd.sau_kernels": {"choice": []}}, "cdkd.sau_kernels: choice: expected a non-empty"),
    ({"cdkd.sau_kernels": {"choice": [[1, 1, 2, 0], [1, 2]]}},
     "cdkd.sau_kernels: value '1-2' is refused"),
    ({"cdkd.etht": {"choice": [["tau"], ["gamma"]]}}, "cdkd.etht: value ['gamma'] is refused"),
    ({"cdkd.sau_kernels": {"choice": ["1-1-2-0"], "when": {"cdkd.sau": True}}},
     "cdkd.sau_kernels: when: expected conditions on parameters listed above"),
])
def test_invalid_space_names_file_and_key(tmp_path, params, message):
    path = _space(tmp_path, params)
    with pytest.raises(ConfigError) as e:
        load_space(path, load_config(SMOKE))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_resumable_asha_rebuilds_its_rungs_and_lets_the_last_epoch_finish(tmp_path,
                                                                          ray_local):
    """Real Tune trials and Ray's ASHA bracket: a restored trial's saved results fill the
    rungs (plain ASHA would start them empty), so a new trial that is worse at epoch 1 stops,
    and a trial's last epoch (ASHA's top rung here: max_t = 4) is never stopped."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from kdray.orchestration.tune import ResumableASHA

    def trial(tid: str, history: tuple = ()) -> Trial:
        t = Trial("run_trial", stub=True, trial_id=tid,
                  storage=StorageContext(storage_path=str(tmp_path), experiment_dir_name="s"))
        t.init_local_path()
        if history:                 # what Tune saved of it before the kill
            Path(t.path).mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"epoch": e, "val_err_visible": v}) for e, v in history]
            Path(t.path, "result.json").write_text("\n".join(lines) + '\n{"epoch": 5, "val')
            t.run_metadata.last_result = {"epoch": history[-1][0]}
        return t

    asha = ResumableASHA(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2,
                         stop_last_trials=False)
    asha.set_search_properties("val_err_visible", "min")
    asha.on_trial_add(None, trial("old", ((1, 30.0), (2, 25.0), (3, 24.0), (4, 23.0))))
    assert {m: r for m, r in asha._brackets[0]._rungs} == {
        1: {"old": -30.0}, 2: {"old": -25.0}, 4: {"old": -23.0}}   # the cut line is skipped
    worse, better = trial("worse"), trial("better")
    for t in (worse, better):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, worse, {"epoch": 1, "val_err_visible": 90.0}) == "STOP"
    assert [asha.on_trial_result(None, better, {"epoch": e, "val_err_visible": v})
            for e, v in ((1, 20.0), (2, 20.0), (4, 99.0))] == ["CONTINUE"] * 3


def test_sweep_metric_is_checked_and_joint_errors_are_minimised(tmp_path):
    cfg = load_config(SMOKE)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"stage": "cdkd", "metric": "val_err_visible",
                                    "params": {"cdkd.alpha": {"uniform": [0.5, 2.0]}}}))
    assert load_space(path, cfg).metric == "val_err_visible"
    assert (metric_mode("val_err_visible"), metric_mode("val_AP")) == ("min", "max")
    path.write_text(yaml.safe_dump({"stage": "cdkd", "metric": "val_loss",
                                    "params": {"cdkd.alpha": {"uniform": [0.5, 2.0]}}}))
    with pytest.raises(ConfigError) as e:
        load_space(path, cfg)
    assert str(e.value).startswith(f"{path}: metric: 'val_loss' is not a metric the cdkd stage "
                                   "reports on synthpose: one of val_AP,"), str(e.value)
    assert "val_err_visible" in str(e.value)


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="stage: expected one of"):
        load_space(_space(tmp_path, {"cdkd.alpha": {"uniform": [0, 1]}}, stage="gan"),
                   load_config(SMOKE))


def test_define_by_run_samples_conditionals_and_decodes_labels():
    cfg = load_config(SMOKE)
    space = load_space(REPO / "search_spaces" / "cdkd.yaml", cfg)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0))
    seen = set()
    for i in range(12):
        trial = study.ask()
        define_by_run(space)(trial)
        values = space.overrides(trial.params, cfg)
        seen.add(values["cdkd.sau"])
        assert ("cdkd.sau_kernels" in values) == values["cdkd.sau"]   # conditional
        if values["cdkd.sau"]:
            assert values["cdkd.sau_kernels"] in {"1-1-1-0", "2-1-1-0", "3-1-1-0", "1-2-1-0",
                                                  "1-1-2-0", "1-1-1-1"}
        assert isinstance(values["cdkd.etht"], list)
        assert all(isinstance(v, (str, int, float, bool)) for v in trial.params.values())
        study.tell(trial, float(i))
    assert seen == {True, False}


def _sampled_independently(sampler, space, trials=20) -> set[str]:
    """Parameters some trial past TPE's 10 start-up trials drew outside the multivariate model.
    Optuna 5 no longer warns by default; multivariate TPE stores what it sampled jointly in the
    trial's system attributes ("tpe:relative_params:<chunk>", JSON), the rest fell back."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for i in range(trials):
        trial = study.ask()
        define_by_run(space)(trial)
        study.tell(trial, float(i % 5))
    out = set()
    for t in study.trials[10:]:
        chunks = [v for k, v in sorted(t.system_attrs.items()) if k.startswith("tpe:relative")]
        out |= set(t.params) - set(json.loads("".join(chunks)) if chunks else {})
    return out


def test_conditional_space_samples_without_the_independent_fallback():
    space = load_space(REPO / "search_spaces" / "cdkd.yaml", load_config(SMOKE))
    assert _sampled_independently(make_sampler(0), space) == set()
    # the check can fail: plain multivariate TPE falls back for the conditional parameter
    plain = optuna.samplers.TPESampler(multivariate=True, seed=0)
    assert _sampled_independently(plain, space) == {"cdkd.sau_kernels"}


def test_grid_values_are_tried_first(tmp_path):
    from ray.tune.search.optuna import OptunaSearch
    cfg = load_config(SMOKE)
    space = load_space(_space(tmp_path, {"cdkd.projectors": {"grid": [1, 3, 5]},
                                         "cdkd.alpha": {"loguniform": [0.1, 10.0]}}), cfg)
    searcher = OptunaSearch(space=define_by_run(space), metric="m", mode="max", seed=0,
                            points_to_evaluate=space.grid_points())
    firsts = [searcher.suggest(f"t{i}")["cdkd.projectors"] for i in range(3)]
    assert firsts == [1, 3, 5]


# ----------------------------------------------------------------------------- a real sweep

def _sweep_module():
    return load_script(SCRIPT, "sweep_pipeline")


def grid_trials(out: Path) -> dict[int, str]:
    """Tune's trial number (1, 2, ... in the order the searcher proposed them) -> trial id,
    from the trial folders ``run_trial_<id>_<number>_<params>``."""
    return {int(d.name.split("_")[3]): d.name.split("_")[2]
            for d in (out / "tune" / "sweep").glob("run_trial_*")}


def _finished_in_state(tune_dir: Path) -> bool:
    """Tune's saved experiment state lists a TERMINATED trial (what --resume will read)."""
    for f in tune_dir.glob("experiment_state-*.json"):
        with contextlib.suppress(OSError, ValueError):
            if "TERMINATED" in f.read_text():
                return True
    return False


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, smoke_data, ray_local):
    storage = tmp_path_factory.mktemp("sweep")
    space = yaml.safe_load((REPO / "search_spaces" / "cdkd.yaml").read_text())
    space["metric"] = "val_err_visible"
    space["params"] = {"cdkd.student.train.lr": {"grid": [3.0e-3, 0.0]}, **space["params"]}
    (storage / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    argv = [str(storage / "space.yaml"), "--config", str(SMOKE), "--storage", str(storage),
            "--num-samples", "4", *FAST, f"data.root={smoke_data}",
            "cdkd.student.train.epochs=3", "ray.cpus_per_worker=2"]   # one trial at a time
    out = storage / "runs" / "sweep"
    run_then_kill(SCRIPT, argv, storage, storage / "killed.log",
                  lambda: bool(list(out.glob("trials/*/result.json"))
                               and _finished_in_state(out / "tune" / "sweep")),
                  300, "no trial finished",
                  env={"TUNE_GLOBAL_CHECKPOINT_S": "1",   # its own Ray: 2 CPUs on any machine
                       "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 2})})
    before = {d.name for d in out.glob("trials/*") if (d / "result.json").exists()}
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()) as stdout, contextlib.redirect_stderr(err):
        summary = _sweep_module().main([*argv, "--resume"])
    return {"before": before, "summary": summary, "stdout": stdout.getvalue(), "out": out,
            "err": err.getvalue()}


def test_resume_completes_the_sweep_without_rerunning_finished_trials(resumed):
    summary, out = resumed["summary"], resumed["out"]
    assert resumed["before"], "the first run was killed before any trial finished"
    assert "resuming the sweep" in resumed["err"]
    attempts, m = summary["outputs"]["trial_attempts"], summary["metrics"]
    assert len(attempts) == 4
    for tid in resumed["before"]:
        assert attempts[tid] == 1, (tid, attempts)           # not started again
    finished = {t for t in attempts if (out / "trials" / t / "result.json").exists()}
    grid = grid_trials(out)   # the grid's points come first: lr 3e-3, then lr 0
    assert grid[1] in finished and grid[2] not in finished, (grid, finished)
    assert m["trials_stopped"] == 4.0 - len(finished) >= 1.0, m
    for d in (out / "tune" / "sweep").glob("run_trial_*"):
        lines = (d / "result.json").read_text().splitlines()
        epochs = [json.loads(x).get("epoch") for x in lines]
        if 3 in epochs:                     # a trial that trained its last epoch finished
            assert d.name.split("_")[2] in finished, d.name
    assert m["trials_finished"] == len(finished), m


def test_sweep_writes_best_config_summary_and_mlflow_runs(resumed):
    from mlflow.tracking import MlflowClient
    summary, out = resumed["summary"], resumed["out"]
    line = [x for x in resumed["stdout"].splitlines() if x.startswith("{")][-1]
    assert json.loads(line) == summary == json.loads((out / "summary.json").read_text())
    best = load_config(summary["outputs"]["best_config"])     # a valid, complete config
    assert 1 <= best.cdkd.projectors <= 5 and best.cdkd.student.train.lr == 3.0e-3
    m = summary["metrics"]
    # training time summed over the trials (all attempts, the killed run's too: result.json of
    # a finished trial, the train_seconds at its last report of one ASHA stopped); each figure
    # is rounded to 0.1 s and the ratio to 3 decimals
    def seconds(trial: Path) -> float:
        if (trial / "result.json").exists():
            return json.loads((trial / "result.json").read_text())["train_seconds"]
        return float((trial / "train_seconds").read_text())
    trained = sum(seconds(out / "trials" / t) for t in summary["outputs"]["trial_attempts"])
    assert m["trials"] == 4.0 and m["trial_train_seconds"] == pytest.approx(trained, abs=0.051)
    # sweep_seconds is rounded to 0.1 s (a resumed sweep with nothing left may take 0.04 s):
    # each rounding moves wall/train by up to 0.05 (1 + wall/train) / train, the ratio's own 0.0005
    ratio = m["sweep_seconds"] / m["trial_train_seconds"]
    assert m["overhead_ratio"] == pytest.approx(
        ratio, rel=0.02, abs=0.05 * (1 + ratio) / m["trial_train_seconds"] + 0.0005)
    client = MlflowClient(summary["outputs"]["mlflow_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trials = {r.data.tags["kdray.trial_id"] for r in children if "kdray.trial_id" in r.data.tags
              and "kdray.orphaned" not in r.data.tags}
    assert trials == set(summary["outputs"]["trial_attempts"])     # one child run per trial
    stopped = {t for t in trials if not (out / "trials" / t / "result.json").exists()}
    assert stopped
    for r in children:   # a trial killed before Tune saved it: closed, never left RUNNING
        if "kdray.orphaned" in r.data.tags:
            assert r.info.status != "RUNNING" and r.data.tags["kdray.trial_id"] not in trials
        elif r.data.tags.get("kdray.trial_id") in stopped:    # stopped by ASHA: closed KILLED
            assert r.info.status == "KILLED" and r.data.tags["kdray.early_stopped"] == "true"
    name, version = summary["outputs"]["candidate"].removeprefix("models:/").split("/")
    assert str(client.get_model_version_by_alias(name, "candidate").version) == version
    with pytest.raises(Exception):
        client.get_model_version_by_alias(name, "champion")      # a sweep only proposes
