"""`pipelines/ablation.py --table cdkd-vi --seeds 1` on the smoke config, on a real local Ray
(2 CPUs) and a temp MLflow store: five rows beside the paper's numbers, one teacher for the
whole table, each row's CDKD stage trained with its own projector count."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pandas as pd
import pytest
import yaml

from kdray.orchestration import ray_train
from kdray.orchestration.ablation import load_table, plan
from kdray.config import load_config

from .conftest import FAST, REPO, SMOKE


def test_tsd_iv_plan_shares_students_between_rows():
    cfg = load_config(SMOKE, ["data.root=/abs/data"])
    counts = plan({**load_table("tsd-iv"), "name": "tsd-iv"}, cfg, 2, "teacher-key")
    # per seed: 4 distinct stage-1 students (none, fea, fea+pose, full) and 3 GCNs (gt on the
    # undistilled one, teacher-distilled on the undistilled and on the full one); + 1 teacher
    assert counts == {"trials": 14, "stage_runs": 1 + 2 * (4 + 3),
                      "stage_runs_uncached": 7 * 2 + 2 * (1 + 2 + 1 + 1 + 1 + 2 + 2)}


@pytest.fixture(scope="module")
def table(tmp_path_factory, smoke_data, ray_local):
    storage = tmp_path_factory.mktemp("ablation")
    spec = importlib.util.spec_from_file_location("ablation_pipeline",
                                                  REPO / "pipelines" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--table", "cdkd-vi", "--config", str(SMOKE), "--seeds", "1", "--storage",
            str(storage), *FAST, f"data.root={smoke_data}"]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(err):
        summary = module.main(argv)
    return {"summary": summary, "stdout": out.getvalue(), "err": err.getvalue(),
            "cache": storage / "runs" / "stages"}


def test_table_has_five_rows_with_the_paper_column(table):
    summary = table["summary"]
    md = open(summary["outputs"]["md"]).read()
    rows = [line for line in md.splitlines() if line.startswith("| n")]
    assert len(rows) == 5 and "paper Mean" in md and "78.621" in rows[0]
    df = pd.read_parquet(summary["outputs"]["parquet"])
    assert list(df["row"]) == ["n1", "n2", "n3", "n4", "n5"]
    assert df["paper_Mean"].tolist() == [78.621, 79.037, 79.362, 76.937, 76.831]
    assert (df["seeds"] == 1).all() and df["mean"].notna().all()
    # the statistics columns are there; one seed gives no interval, so nothing is resolved
    assert {"ci95", "vs_baseline", "vs_ci_lo", "vs_ci_hi", "p", "resolved"} <= set(df.columns)
    assert (df["baseline"] == "n3").all() and not df["resolved"].any()
    n3 = df.set_index("row").loc["n3"]
    assert n3["ci95"] != n3["ci95"] and n3["vs_baseline"] != n3["vs_baseline"]   # NaN
    n1 = df.set_index("row").loc["n1"]
    assert n1["vs_baseline"] == pytest.approx(n1["mean"] - n3["mean"])
    assert "| vs baseline |" in md and "(baseline)" in rows[2]
    assert all(len(ids) == 1 for ids in df["mlflow_run_ids"])
    assert open(summary["outputs"]["png"], "rb").read(4) == b"\x89PNG"
    line = [x for x in table["stdout"].splitlines() if x.startswith("{")][-1]
    assert json.loads(line) == summary and summary["metrics"]["trials_failed"] == 0.0


def test_console_has_one_line_per_trial_and_no_tune_tables(table):
    done = [x for x in table["err"].splitlines() if x.startswith("[kdray] cdkd-vi: trial ")]
    assert [x.split(" done")[0] for x in done] == [f"[kdray] cdkd-vi: trial {i}/5"
                                                  for i in range(1, 6)]
    assert all(" left)" in x and ": AP " in x for x in done), done
    for chatter in ("Trial status", "Configuration for experiment", "Trial run_row"):
        assert chatter not in table["err"] + table["stdout"]


def test_rows_differ_in_projector_count_and_share_one_teacher(table):
    cache, m = table["cache"], table["summary"]["metrics"]
    projectors = sorted(yaml.safe_load((d / "config.yaml").read_text())["cdkd"]["projectors"]
                        for d in cache.glob("cdkd-*") if d.is_dir())
    assert projectors == [1, 2, 3, 4, 5]
    teachers = [d for d in cache.glob("teacher-*") if d.is_dir()]
    assert len(teachers) == 1 and len(ray_train.read_attempts(teachers[0])) == 1
    assert m["stage_runs_planned"] == m["stage_runs_trained"] == 6.0   # 1 teacher + 5 rows
    assert m["stage_runs_uncached"] == 10.0
    assert "cdkd-vi: 5 rows x 1 seeds = 5 trials -> 6 stage runs" in table["err"]


def test_each_row_is_an_mlflow_child_of_the_table_run(table):
    from mlflow.tracking import MlflowClient
    summary = table["summary"]
    client = MlflowClient(summary["outputs"]["mlflow_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"table.md", "table.parquet", "table.png"} <= arts
    for row, ids in summary["outputs"]["mlflow_run_ids"].items():
        run = client.get_run(ids[0])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["kdray.row"] == row and run.info.status == "FINISHED"
