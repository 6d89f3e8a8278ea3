"""What a stage needs from a Ray cluster of several nodes (docs/operations.md, "Several nodes").

Ray Train persists every reported checkpoint to its run storage and a replacement worker group
(on whichever node) resumes from there, so the storage must be one place that every node
reaches: a URI (``s3://``, ``gs://``, ...) or a folder on a mount they share (NFS). Ray itself
notices a node-local folder only when the first checkpoint is uploaded, an epoch too late;
:func:`check_storage` refuses it before any training. Actors that must outlive a lost worker
node (the progress queue) are pinned to the driver's node with :func:`on_driver_node`.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from kdray.config import ConfigError

SET_IT = ("set ray.storage_path to s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a folder on a "
          "mount every node shares (NFS)")


def cpu_nodes() -> list[dict]:
    """The alive nodes that can run a Ray Train worker (they have CPUs)."""
    import ray
    return [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]


def on_driver_node() -> dict:
    """Actor options that keep an actor on this (the driver's) node: a worker node lost
    mid-stage must not take it along."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}


def check_storage(storage: str) -> None:
    """Refuse (ConfigError: exit 2) Ray Train storage that some node cannot reach, on a cluster
    with more than one node with CPUs: a plain folder (``ray.storage_path``, or kdray's default
    ``<stage cache>/ray``, shared when ``--storage`` is a shared mount) must be visible from
    every such node: a file written into it here must exist there."""
    if "://" in storage:
        return  # object stores: every node reaches them with the same credentials
    nodes = cpu_nodes()
    if len(nodes) < 2:
        return
    missing = unseen_from(Path(storage), nodes)
    if missing:
        raise ConfigError(f"ray.storage_path: Ray Train's storage {storage} is not visible from "
                          f"node(s) {', '.join(missing)} of the {len(nodes)} nodes with CPUs; "
                          f"{SET_IT}")


def unseen_from(folder: Path, nodes: list[dict]) -> list[str]:
    """The nodes (``ip/node-id``) on which a file just written into ``folder`` does not exist:
    a zero-CPU task pinned to each node looks for it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder.mkdir(parents=True, exist_ok=True)
    token = folder / f".kdray-probe-{uuid.uuid4().hex}"
    token.write_text("kdray storage probe\n")
    try:
        probe = ray.remote(num_cpus=0)(_exists)
        seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(token)) for n in nodes])
    finally:
        token.unlink(missing_ok=True)
    return [f"{n['NodeManagerAddress']}/{n['NodeID'][:8]}" for n, ok in zip(nodes, seen)
            if not ok]


def _exists(path: str) -> bool:
    return os.path.exists(path)
