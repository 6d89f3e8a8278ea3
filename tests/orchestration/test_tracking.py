"""MLflow store: concurrent writers lose nothing; the tracking URI resolves to absolute paths."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from kdray.orchestration import registry, tracking

WRITERS, EPOCHS, KEYS = 8, 20, 10

WRITER = textwrap.dedent("""
    import sys
    from kdray.orchestration.tracking import Tracker
    uri, exp, parent, i = sys.argv[1:5]
    run = Tracker(uri, exp, parent).run(f"writer-{i}", tags={"writer": i},
                                        params={f"p{j}": j for j in range(120)})  # > 100: batched
    for epoch in range(1, %d + 1):
        run.log_metrics({f"m{j}": epoch * 100 + j for j in range(%d)}, epoch)
    run.close()
""" % (EPOCHS, KEYS))


def test_eight_concurrent_writers_lose_no_run_or_metric(tmp_path):
    uri = tracking.resolve_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    store = tracking.Tracker.open(uri, "kdray")     # the driver creates the store first
    exp, sweep = store.experiment_id, store.run("sweep")
    parent = sweep.run_id
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, exp, parent, str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(WRITERS)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    sweep.close()

    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'", max_results=100)
    assert sorted(r.data.tags["writer"] for r in runs) == [str(i) for i in range(WRITERS)]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert len(r.data.params) == 120
        for j in range(KEYS):
            hist = client.get_metric_history(r.info.run_id, f"m{j}")
            assert sorted((m.step, m.value) for m in hist) == \
                [(e, e * 100.0 + j) for e in range(1, EPOCHS + 1)]


def test_uri_is_absolute_and_relative_sqlite_resolves_against_storage(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KDRAY_STORAGE", raising=False)
    assert tracking.resolve_uri("", tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.resolve_uri("sqlite:///x/t.db", tmp_path) == \
        f"sqlite:///{tmp_path / 'x' / 't.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_uri("", tmp_path) == "http://127.0.0.1:5000"
    assert tracking.resolve_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"


def test_champion_moves_only_on_a_better_score_on_the_same_val_set():
    class V:
        tags = {"val_set": "a", "metric": "val_AP", "metric_value": "50.0"}
    assert registry._beats(51.0, "val_AP", "a", V)
    assert not registry._beats(50.0, "val_AP", "a", V)
    assert not registry._beats(99.0, "val_AP", "b", V)      # another val set: not comparable
    assert not registry._beats(99.0, "val_Mean", "a", V)
