"""A fault for the fault-tolerance tests, injected into Ray Train workers from outside kdray.

Python imports ``sitecustomize`` at start-up from the first ``sys.path`` entry that has one, so
a process whose ``PYTHONPATH`` begins with this folder runs this file before anything else (the
tests put it there, with the settings below, before Ray starts its workers; see
``tests/orchestration/conftest.py::fault_env``). Nothing happens unless
``$KDRAY_TEST_FAULT_AT_EPOCH`` is set. Then, in a Ray Train worker of rank 0 whose run name
starts with ``$KDRAY_TEST_FAULT_STAGE-`` (kdray names a stage's run ``<stage>-<key>``; any run
if unset), the call of ``ray.train.report`` for that epoch exits the process hard (os._exit;
``KDRAY_TEST_FAULT_ACTION=exit``) or hangs (``=hang``, so the test can kill the driver at a
known point), once: the file ``$KDRAY_TEST_FAULT_MARKER`` remembers that it happened.

It wraps ``ray.train.report`` as the module attribute (kdray's worker looks it up there when it
builds its report callback), patched right after ``ray.train`` is imported.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from pathlib import Path

# Ray's controller picks up a reported checkpoint on its next poll of the workers (every 2 s,
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a fault injected sooner after the previous report would
# test "crashed before the checkpoint was registered" instead of "crashed mid-epoch".
SETTLE_S = 10.0


def _faulty(report, epoch: int, stage: str, action: str, marker: str):
    last = time.monotonic()

    def wrapped(metrics, *args, **kwargs):
        nonlocal last
        import ray.train
        ctx = ray.train.get_context()
        if (int(metrics.get("epoch", 0)) == epoch and ctx.get_world_rank() == 0
                and ctx.get_experiment_name().startswith(f"{stage}-" if stage else "")):
            _fail(action, marker, epoch, last)
        out = report(metrics, *args, **kwargs)
        last = time.monotonic()
        return out
    return wrapped


def _fail(action: str, marker: str, epoch: int, last: float) -> None:
    time.sleep(max(0.0, last + SETTLE_S - time.monotonic()))
    if marker:
        if Path(marker).exists():
            return
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(f"{action} at epoch {epoch}, pid {os.getpid()}\n")
    if action == "hang":
        while True:
            time.sleep(60)
    os._exit(17)


class _PatchRayTrain(importlib.abc.MetaPathFinder):
    """Finds ``ray.train`` as usual and wraps its ``report`` once the module has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "ray.train":
            return None
        sys.meta_path.remove(self)          # once; and find_spec below must not find us
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.report = _faulty(module.report, int(os.environ["KDRAY_TEST_FAULT_AT_EPOCH"]),
                                    os.environ.get("KDRAY_TEST_FAULT_STAGE", ""),
                                    os.environ.get("KDRAY_TEST_FAULT_ACTION", "exit"),
                                    os.environ.get("KDRAY_TEST_FAULT_MARKER", ""))
        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("KDRAY_TEST_FAULT_AT_EPOCH"):
    sys.meta_path.insert(0, _PatchRayTrain())


# A node without a shared mount: in the processes of a node started with
# ``KDRAY_TEST_UNSHARED_DIR=<dir>`` (conftest.ray_cluster's ``node_env``), files under <dir> do
# not exist, as on a machine that does not mount it (one machine cannot show two nodes two
# filesystems otherwise).
def _unshared(folder: str) -> None:
    import os.path
    exists = os.path.exists

    def hidden_exists(path) -> bool:
        if os.path.abspath(os.fspath(path)).startswith(folder.rstrip("/") + "/"):
            return False
        return exists(path)
    os.path.exists = hidden_exists


if os.environ.get("KDRAY_TEST_UNSHARED_DIR"):
    _unshared(os.environ["KDRAY_TEST_UNSHARED_DIR"])
