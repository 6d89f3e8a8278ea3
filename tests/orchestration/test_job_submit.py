"""`ray job submit --working-dir . -- python pipelines/two_stage.py` against a local head.

Runs scripts/job_submit_check.sh (its own head on free ports and a private temp dir, token
auth, dashboard on 127.0.0.1; that head alone is stopped afterwards). About 2.5 minutes on a
2-core CPU, so it is marked slow: `pytest -m slow tests/orchestration/test_job_submit.py`.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from .conftest import FAST, REPO


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline_and_keeps_outputs_in_storage(tmp_path, smoke_data):
    storage = tmp_path / "storage"
    env = {**os.environ, "KDRAY_PROGRESS": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([str(REPO / "scripts" / "job_submit_check.sh"), str(storage), *FAST,
                           f"data.root={smoke_data}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    summary = json.loads((storage / "runs" / "two_stage" / "summary.json").read_text())
    assert summary["outputs"]["mlflow_uri"] == f"sqlite:///{storage / 'runs' / 'smoke' / 'mlflow.db'}"
    assert all(str(storage) in p for p in summary["outputs"]["stages"].values())
