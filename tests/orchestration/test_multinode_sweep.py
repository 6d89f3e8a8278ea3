"""A sweep whose trials each train on 2 Ray Train workers, on a cluster of 1-CPU nodes
(conftest.ray_cluster): as many trials at once as the cluster's CPUs hold, ASHA stops the
trials that fall behind at epoch 1 (their worker groups give the CPUs back to the next trial),
and a sweep whose driver is killed after its first finished trial completes with --resume.

The sweep minimises the visible-joint error: on the smoke config every trial's val_AP after 1-2
epochs is 0.0, a tie that ASHA never breaks. The grid pits lr 3e-3 against lr 0 (a trial that
cannot learn): measured at epoch 1, joint error 33 against 98 (% of the box size). Ray Train's
controller hands reports to Tune at its polls (0.5-2 s apart), so a trial has 12 epochs: ASHA's
stop reaches it while it still trains, as it does on real data, where an epoch takes minutes."""
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
from .test_tune import _finished_in_state, grid_trials

SCRIPT = REPO / "pipelines" / "sweep.py"


@pytest.mark.slow
def test_two_worker_trials_on_three_nodes(smoke_data, tmp_path):
    storage = tmp_path
    space = tmp_path / "lr.yaml"
    space.write_text("stage: cdkd\nmetric: val_err_visible\n"
                     "params:\n  cdkd.student.train.lr: {grid: [3.0e-3, 0.0]}\n")
    argv = [str(space), "--config", str(SMOKE), "--storage",
            str(storage), "--num-samples", "4", *FAST, f"data.root={smoke_data}",
            "ray.num_workers=2", "ray.cpus_per_worker=0.9", "cdkd.student.train.epochs=12",
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
    assert m["trials"] == 4.0, m
    # ASHA at epoch 1: the grid's lr-0 trial stopped against the lr-3e-3 one that finished
    # before the kill (its rung rebuilt on --resume), and its CPUs went to the trials after it
    finished = {tid for tid in attempts if (out / "trials" / tid / "result.json").exists()}
    grid = grid_trials(out)
    assert grid[1] in finished and grid[2] not in finished, (grid, finished)
    assert m["trials_stopped"] == 4.0 - len(finished) >= 1.0, m
    assert m["trials_finished"] == len(finished), m
    assert m["best_val_err_visible"] < 60.0, m    # the best is a trial that learnt (lr 3e-3)
    for tid in attempts:
        starts = ray_train.read_attempts(out / "trials" / tid)
        workers = [a for a in starts if "world_size" in a]
        assert workers and all(a["world_size"] == 2 for a in workers), starts
