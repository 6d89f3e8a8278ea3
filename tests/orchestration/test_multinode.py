"""Several nodes: a stage whose two Ray Train workers run on different nodes (separate raylets
and temp dirs on this machine, tests/orchestration/conftest.py::ray_cluster) trains as on one
node, survives losing a node mid-stage, and refuses storage the nodes do not share."""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import mlflow
import pytest

from kdray.config import ConfigError, load_config
from kdray.orchestration import pipeline, ray_train
from kdray.orchestration.args import parse_args
from kdray.orchestration.cluster import check_storage
from kdray.stages import TEACHER

from .conftest import FAST, SMOKE, local_ray, ray_cluster

TWO_NODES = [*FAST, "data.max_train=64", "teacher.model.backbone=mobilenetv3_small_100",
             "teacher.model.freeze_bn=true", "teacher.train.epochs=3",
             "teacher.train.eval_every=3", "ray.num_workers=2", "ray.cpus_per_worker=1",
             "ray.max_failures=2"]


def _cfg(smoke_data, shared: Path):
    return load_config(SMOKE, [*TWO_NODES, f"data.root={smoke_data}",
                               f"ray.storage_path={shared / 'ray'}"])


def _losses(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k.startswith("loss")} for h in history]


def test_node_local_storage_is_refused_before_training(smoke_data, tmp_path):
    """Two nodes with CPUs, one of which does not see the storage folder (it does not mount
    it: fault_hook/sitecustomize.py): refused before any worker starts, naming what to set;
    a folder that every node sees passes the same check."""
    cfg = load_config(SMOKE, [*TWO_NODES, f"data.root={smoke_data}"])
    local = tmp_path / "local"
    with ray_cluster(workers=2, node_env={"KDRAY_TEST_UNSHARED_DIR": str(local)}):
        with pytest.raises(ConfigError, match=r"^ray\.storage_path: Ray Train's storage .*/local/"
                                              r"ray is not visible from node\(s\) 127\.0\.0\.1/"
                                              r"\w{8} of the 2 nodes with CPUs; set "
                                              r"ray\.storage_path to s3://"):
            ray_train.train_stage(TEACHER, cfg, tmp_path / "stage", {}, "teacher-local",
                                  local / "ray")
        check_storage(str(tmp_path / "shared"))
        assert list((tmp_path / "shared").iterdir()) == []   # the probe file is gone
    assert list((local / "ray").iterdir()) == [] and not (tmp_path / "stage").exists() or \
        ray_train.read_attempts(tmp_path / "stage") == []


@pytest.fixture(scope="module")
def one_node(smoke_data, tmp_path_factory):
    """The reference: the same 2-worker stage on a 1-node local Ray (2 CPUs)."""
    shared = tmp_path_factory.mktemp("one_node")
    with local_ray():
        return ray_train.train_stage(TEACHER, _cfg(smoke_data, shared), shared / "stage", {},
                                     "teacher-one-node", shared / "ray").history


@pytest.fixture(scope="module")
def cluster(one_node):  # after the reference: one Ray per process at a time
    with ray_cluster(workers=2) as c:
        yield c


@pytest.mark.slow
def test_two_nodes_train_as_one(one_node, cluster, smoke_data, tmp_path):
    result = ray_train.train_stage(TEACHER, _cfg(smoke_data, tmp_path), tmp_path / "stage", {},
                                   "teacher-two-nodes", tmp_path / "ray")
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    _assert_same_losses(result.history, one_node)
    attempts = ray_train.read_attempts(tmp_path / "stage")
    assert len(attempts) == 1 and attempts[0]["world_size"] == 2
    _assert_scratch_on_node(attempts[0], cluster[0])


@pytest.mark.slow
def test_node_lost_mid_stage_resumes_to_the_uninterrupted_result(one_node, cluster, smoke_data,
                                                                 tmp_path):
    """A worker node killed (not drained) once epoch 1's checkpoint is in the shared storage,
    a fresh node added: the worker group restarts from the latest checkpoint; the pipeline's
    stage cache and MLflow see one finished stage."""
    c, add_node = cluster
    argv = ["--storage", str(tmp_path), *TWO_NODES, f"data.root={smoke_data}",
            f"ray.storage_path={tmp_path / 'shared' / 'ray'}"]
    args, cfg = parse_args("multinode", ["--config", str(SMOKE), *argv])
    # The pipeline runs in a thread: Cluster.add_node installs signal handlers, which only
    # the main thread may do, so the node is lost and replaced from here.
    done: dict = {}

    def run() -> None:
        try:
            with pipeline.Pipeline("multinode", cfg, args, stages=1) as p:
                done["result"], done["uri"], done["run_id"] = p.stage(TEACHER), p.uri, p.run_id
        except BaseException as exc:  # reported below, in the test's thread
            done["error"] = exc

    driver = threading.Thread(target=run, daemon=True)
    driver.start()
    # Epoch 1's checkpoint registered by Ray Train (its manager's snapshot names it), not
    # merely uploaded: a node lost in between would restart from scratch.
    while not _registered_checkpoint(tmp_path / "shared" / "ray"):
        assert driver.is_alive(), f"the stage ended before its first checkpoint: {done}"
        time.sleep(0.2)
    c.remove_node(sorted(c.worker_nodes, key=lambda n: n.node_id)[0], allow_graceful=False)
    add_node()
    driver.join(timeout=600)
    assert "error" not in done and not driver.is_alive(), done
    result = done["result"]

    stage_dir = Path(result.out_dir)
    attempts = ray_train.read_attempts(stage_dir)
    starts = [a["start_epoch"] for a in attempts]
    assert len(starts) == 2 and starts[0] == 1 and starts[1] in (2, 3), starts
    for attempt in attempts:
        _assert_scratch_on_node(attempt, c)
    history = ray_train.load_checkpoint(stage_dir / "checkpoints" / "last.pt")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    _assert_same_losses(history, one_node)

    cache = tmp_path / "runs" / "stages"
    assert [d.name for d in cache.iterdir() if d.is_dir() and d.name.startswith("teacher-")] \
        == [stage_dir.name]
    assert (stage_dir / "stage.json").is_file()
    client = mlflow.MlflowClient(done["uri"])
    runs = client.search_runs([client.get_run(done["run_id"]).info.experiment_id],
                              "tags.`kdray.stage` = 'teacher'")
    assert [(r.info.run_id, r.info.status) for r in runs] == [(result.run_id, "FINISHED")]


def _registered_checkpoint(storage: Path) -> bool:
    for snapshot in storage.glob("teacher-*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(OSError):
            if "checkpoint_" in snapshot.read_text():
                return True
    return False


def _assert_same_losses(history: list[dict], reference: list[dict]) -> None:
    """Equal to the 1-node run's per-epoch losses within 1e-6 relative (same thread counts and
    reduction order; the margin is for gloo on another transport)."""
    for ours, ref in zip(_losses(history), _losses(reference), strict=True):
        assert set(ours) == set(ref)
        for key, value in ref.items():
            assert ours[key] == pytest.approx(value, rel=1e-6), (key, ours[key], value)


def _assert_scratch_on_node(attempt: dict, cluster) -> None:
    """Rank 0's scratch dir was under its own node's TMPDIR (conftest.ray_cluster), not /tmp."""
    scratch = Path(attempt["scratch"])
    nodes = {n.node_id: n for n in cluster.list_all_nodes()}
    node_tmp = Path(nodes[attempt["node"]].get_temp_dir_path()).parent / "tmp" \
        if attempt["node"] in nodes else None
    assert scratch.parent.name == "tmp" and scratch.parent.parent.name.startswith("n"), scratch
    if node_tmp is not None:  # a removed node is no longer listed
        assert scratch.parent == node_tmp, (scratch, node_tmp)
