"""Fixtures for the orchestration tests: a real local Ray (2 CPUs) and one tiny SynthPose set.

Every test here runs the real thing (Ray Train workers, a sqlite MLflow store in a temp dir) on
configs/smoke.yaml, made smaller still by :data:`FAST`, so the whole folder stays within a few
minutes on a 2-core CPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
# 2 training steps per epoch; fp32 because bf16's first-batch kernel warm-up costs more than the
# whole tiny epoch on CPU.
FAST = ["data.max_train=32", "teacher.train.precision=fp32"]


def load_script(path: Path, name: str):
    """A pipeline script (pipelines/*.py) as a module, to call its ``main(argv)`` in-process."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAULT_HOOK = Path(__file__).resolve().parent / "fault_hook"


def fault_env(epoch: int, marker: Path, action: str = "exit", stage: str = "") -> dict:
    """Environment for a process that starts Ray: its Ray Train workers load
    fault_hook/sitecustomize.py, whose rank-0 worker exits (or hangs) at epoch ``epoch``'s
    report of ``stage``'s run, once (``marker`` records it). kdray itself knows nothing of it."""
    path = os.pathsep.join(p for p in (str(FAULT_HOOK), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "KDRAY_TEST_FAULT_AT_EPOCH": str(epoch),
            "KDRAY_TEST_FAULT_ACTION": action, "KDRAY_TEST_FAULT_STAGE": stage,
            "KDRAY_TEST_FAULT_MARKER": str(marker)}


def kill_ray_under(ray_tmp: str) -> None:
    """Stop what a killed driver's private Ray left behind: processes whose command line
    names its own temp dir (ours alone), by pid."""
    found = subprocess.run(["pgrep", "-f", "--", ray_tmp], capture_output=True, text=True)
    for pid in map(int, found.stdout.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_then_kill(script: Path, argv: list[str], cwd: Path, log_path: Path, until,
                  timeout_s: float, what: str, env: dict | None = None) -> None:
    """Run ``script argv`` as its own process group with a private Ray temp dir, wait until
    ``until()`` holds (failing with ``what`` after ``timeout_s``), then SIGKILL the group and
    its Ray: a driver killed mid-run, as a user's Ctrl-\\ or a lost machine would."""
    ray_tmp = tempfile.mkdtemp(prefix="kk-")  # short: Ray's socket paths have a length limit
    full_env = {**os.environ, "KDRAY_PROGRESS": "0", "RAY_TMPDIR": ray_tmp, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), *argv], env=full_env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        try:
            deadline = time.time() + timeout_s
            while not until():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, what
                time.sleep(0.3)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kill_ray_under(ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """SynthPose at the smoke size, generated once per session (data.root=<this>)."""
    from kdray.config import load_config
    from kdray.stage_run import ensure_data
    root = tmp_path_factory.mktemp("smoke_data") / "smoke"
    cfg = load_config(SMOKE, [f"data.root={root}"])
    ensure_data(cfg)
    return root


@contextlib.contextmanager
def _environ(env: dict | None):
    """``os.environ`` plus ``env`` inside the block (Ray's processes inherit it when they
    start), restored afterwards."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_ray(env: dict | None = None):
    """A real local Ray with 2 CPUs, always shut down; ``env`` is set while it starts, so its
    worker processes inherit it (e.g. :func:`fault_env`), and put back afterwards."""
    import ray

    from kdray.orchestration.ray_train import loopback_only
    os.environ.setdefault("KDRAY_PROGRESS", "0")
    loopback_only()   # as kdray's own local Ray: every port on 127.0.0.1
    with _environ(env):
        ray.init(address="local", num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs for this module, always shut down."""
    with local_ray() as ray:
        yield ray


@contextlib.contextmanager
def ray_cluster(workers: int = 2, env: dict | None = None, node_env: dict | None = None):
    """A Ray cluster of separate raylets on this machine (``ray.cluster_utils.Cluster``): a head
    without CPUs (the driver's node) and ``workers`` nodes with 1 CPU each, so that the two Ray
    Train workers of a stage land on different nodes. Each node has its own Ray temp dir and
    its own ``TMPDIR`` (what its workers' ``tempfile.gettempdir()`` returns): the nodes share
    no scratch space, as separate machines would not. Yields ``(cluster, add_node)``;
    ``add_node()`` starts one more such node. ``env`` as in :func:`local_ray`; ``node_env``:
    more environment for the first worker node only, whose processes then load
    fault_hook/sitecustomize.py (e.g. ``KDRAY_TEST_UNSHARED_DIR``)."""
    import ray
    from ray.cluster_utils import Cluster

    from kdray.orchestration.ray_train import loopback_only
    os.environ.setdefault("KDRAY_PROGRESS", "0")
    loopback_only()
    base = Path(tempfile.mkdtemp(prefix="kc-"))  # short: Ray's socket paths have a length limit
    count = iter(range(1000))
    with _environ(env):
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 0, "temp_dir": str(base / "head")})

        def add_node():
            index = next(count)
            node_dir = base / f"n{index}"
            (node_dir / "tmp").mkdir(parents=True)
            extra = {}
            if node_env and index == 0:
                path = os.pathsep.join(p for p in (str(FAULT_HOOK),
                                                   os.environ.get("PYTHONPATH", "")) if p)
                extra = {"PYTHONPATH": path, **node_env}
            return cluster.add_node(num_cpus=1, temp_dir=str(node_dir / "ray"),
                                    env_vars={"TMPDIR": str(node_dir / "tmp"), **extra})

        for _ in range(workers):
            add_node()
        ray.init(address=cluster.address)
    try:
        yield cluster, add_node
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(base, ignore_errors=True)
