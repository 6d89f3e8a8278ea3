"""A sweep whose trials each train on 2 Ray Train workers, on a cluster of 1-CPU nodes
(conftest.ray_cluster): as many trials at once as the cluster's CPUs hold, and a sweep whose
driver is killed after its first finished trial completes with --resume.

Not shown here: ASHA stopping a trial. On the smoke config every trial's val_AP after 1-2
epochs is 0.0, so no trial falls below its rung's cutoff (measured: 4 of 4 finished)."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import FAST, REPO, SMOKE, load_script, ray_cluster
from .test_tune import _finished_in_state

SCRIPT = REPO / "pipelines" / "sweep.py"


@pytest.mark.slow
def test_two_worker_trials_on_three_nodes(smoke_data, tmp_path):
    storage = tmp_path
    argv = [str(REPO / "search_spaces" / "cdkd.yaml"), "--config", str(SMOKE), "--storage",
            str(storage), "--num-samples", "4", *FAST, f"data.root={smoke_data}",
            "ray.num_workers=2", "ray.cpus_per_worker=0.9", "cdkd.student.train.epochs=2",
            "teacher.model.backbone=mobilenetv3_small_100",
            f"ray.storage_path={storage / 'shared'}"]
    out = storage / "runs" / "sweep"
    with ray_cluster(workers=2) as (cluster, _):
        env = {**os.environ, "KDRAY_PROGRESS": "0", "RAY_ADDRESS": cluster.address,
               "TUNE_GLOBAL_CHECKPOINT_S": "1"}
        with open(storage / "killed.log", "w") as log:
            proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=storage,
                                    start_new_session=True)
            try:
                deadline = time.time() + 900
                while not (list(out.glob("trials/*/result.json"))
                           and _finished_in_state(out / "tune" / "sweep")):
                    assert proc.poll() is None, (storage / "killed.log").read_text()[-3000:]
                    assert time.time() < deadline, "no trial finished"
                    time.sleep(0.5)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        killed_log = (storage / "killed.log").read_text()
        before = {d.name for d in out.glob("trials/*") if (d / "result.json").exists()}
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            summary = load_script(SCRIPT, "sweep_multinode").main([*argv, "--resume"])

    # 2 CPUs (two 1-CPU nodes) hold one trial of 2 x 0.9 CPUs plus its 0.01-CPU Tune actor.
    assert "4 trials, at most 1 at once" in killed_log, killed_log[-2000:]
    assert "resuming the sweep" in err.getvalue()
    attempts = summary["outputs"]["trial_attempts"]
    assert len(attempts) == 4 and before
    from kdray.orchestration import ray_train
    for tid in before:   # the trial function's starts (lines without a worker group's world)
        starts = ray_train.read_attempts(out / "trials" / tid)
        assert len([a for a in starts if "world_size" not in a]) == 1, starts  # not rerun
    m = summary["metrics"]
    assert m["trials"] == 4.0 and m["trials_finished"] == 4.0, m   # ties at AP 0: see above
    for tid in attempts:
        starts = ray_train.read_attempts(out / "trials" / tid)
        workers = [a for a in starts if "world_size" in a]
        assert workers and all(a["world_size"] == 2 for a in workers), starts
