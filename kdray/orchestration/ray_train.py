"""Run one stage on Ray Train workers (TorchTrainer), or in-process with ``ray.num_workers: 0``.

The per-worker function only builds the stage (kdray.stage_run.build_stage), prepares the model
and the loader for this rank (``prepare_model``, ``prepare_data_loader``) and calls the plain
:func:`kdray.train.fit` with a report callback: each epoch rank 0 hands Ray the epoch's
checkpoint (``ray.train.report`` is a barrier, so every rank calls it; only rank 0 writes and
evaluates) and puts its progress events on a Ray queue that the driver drains: the driver draws
the progress line and logs the epoch's metrics to the stage's MLflow run, so workers never need
to reach the tracking store. Failures and restarts:

- a worker dies: ``FailureConfig(max_failures)`` starts a new worker group that resumes from
  the latest reported checkpoint (``ray.train.get_checkpoint()``);
- the driver dies: rerunning with the same ``RunConfig(name, storage_path)`` (the stage key)
  restores the run and resumes the same way (docs/operations.md, "Ray Train 2.60").

Each worker start is appended to ``<stage_dir>/attempts.jsonl`` (the epoch it starts at, rank
0's node and scratch dir; the driver writes it), so a resume is visible. The worker's own files live in a scratch dir; the driver copies the final
checkpoint into the stage dir and writes metrics.json and loss_curve.png from its history.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from kdray.config import ExperimentConfig, from_dict, to_dict
from kdray.train import FitResult, fit, load_checkpoint, seed_everything, write_outputs

_started_ray = False
# A Ray that kdray starts for itself runs lean: no prestarted idle workers, no metrics export,
# no usage stats, and no dashboard unless KDRAY_RAY_DASHBOARD=1. Ray's own processes then use
# 1.8 % of one core at idle instead of 4.0 % (bench/ray_daemons.py, bench/RESULTS.md 1b), CPU
# that a 2-core machine takes from training. A user's own setting of these variables wins.
LEAN_LOCAL_RAY = {"RAY_prestart_worker_first_driver": "0", "RAY_enable_metrics_collection": "0",
                  "RAY_USAGE_STATS_ENABLED": "0"}
# Ray Train's controller polls its workers every 2 s by default, and a stage waits for a poll
# at each turn: the worker group up, each report collected, the run over. Polling every 0.5 s
# took ~4 s off a 1-epoch stage's end (smoke two_stage 1:00 -> 0:45), ~1 s off each demo stage,
# and costs the training step nothing measurable (bench/RESULTS.md 1c).
# Ray propagates the variable from the driver to the controller; a user's own setting wins.
CONTROLLER_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# How a Ray worker's DataLoader starts its processes: not fork (Ray's docs on torch
# DataLoaders inside Ray workers; a forked child inherits Ray's threads and gRPC state).
LOADER_START = "forkserver"


def ensure_ray() -> None:
    """Connect to ``$RAY_ADDRESS`` (a ``ray job`` sets it) or start a local Ray, on first use.

    Without ``RAY_ADDRESS`` a fresh local instance is started (``address="local"``), never
    somebody else's cluster that happens to run on this machine, and every port it opens (GCS,
    raylet, object manager, dashboard and its agent) listens on 127.0.0.1 only
    (:func:`loopback_only`). A Ray that the caller initialised (tests, notebooks) is used as it
    is. The workers' own output (Ray Train's status lines, its report dumps) reaches this
    console only with ``--verbose``: kdray's progress comes through :func:`fit_on_ray`. A
    local Ray runs lean (:data:`LEAN_LOCAL_RAY`; the dashboard with ``KDRAY_RAY_DASHBOARD=1``).
    """
    global _started_ray
    import logging

    import ray

    from kdray.console import verbose
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local"
    if local:
        loopback_only()
    # read by the daemons ray.init starts (and their workers)
    with _env_defaults(LEAN_LOCAL_RAY if local else {}):
        ray.init(address=address, log_to_driver=verbose(),
                 logging_level=logging.INFO if verbose() else logging.ERROR,
                 include_dashboard=(os.environ.get("KDRAY_RAY_DASHBOARD") == "1") if local
                 else None)
    _started_ray = True


def loopback_only() -> None:
    """Make a Ray started by this process bind 127.0.0.1 instead of every interface.

    Ray picks the node's address once per process (``ray._private.services``): with
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` it takes the loopback address, as on a laptop, and
    passes it to the GCS, the raylet and the agents it starts (checked with ``ss -ltnp``). The
    variable is read when ray is imported, so the constant is set too in case it already was.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False


def shutdown_ray() -> None:
    """Stop the Ray that :func:`ensure_ray` started (none else)."""
    global _started_ray
    if _started_ray:
        import ray
        ray.shutdown()
        _started_ray = False


def _use_gpu(cfg: ExperimentConfig) -> bool:
    if cfg.ray.use_gpu != "auto":
        return cfg.ray.use_gpu == "yes"
    import ray
    return ray.cluster_resources().get("GPU", 0) > 0


def train_stage(stage, cfg: ExperimentConfig, stage_dir: str | Path, inputs: dict[str, str],
                run_name: str, storage_path: str | Path, mlflow: tuple[str, str] | None = None,
                evaluate: bool = True, progress=None) -> FitResult:
    """Fit one stage: in-process when ``cfg.ray.num_workers == 0``, else on Ray Train.

    ``stage_dir`` ends up holding checkpoints/last.pt, metrics.json, loss_curve.png,
    config.yaml; ``mlflow = (tracking_uri, run_id)`` receives per-epoch metrics (step = epoch);
    ``progress`` (kdray.progress.ConsoleProgress) renders the rank-0 worker's progress here.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "config.yaml").write_text(__import__("yaml").safe_dump(to_dict(cfg),
                                                                         sort_keys=False))
    if cfg.ray.num_workers == 0:
        return _fit_in_process(stage, cfg, stage_dir, inputs, mlflow, evaluate, progress)
    return fit_on_ray(stage, cfg, stage_dir, inputs, run_name, storage_path, mlflow, evaluate,
                      progress=progress)


def _fit_in_process(stage, cfg, stage_dir, inputs, mlflow, evaluate, progress=None) -> FitResult:
    """The plain loop; it resumes from ``stage_dir/checkpoints/last.pt`` by itself."""
    from kdray.stage_run import build_stage
    seed_everything(stage.seed(cfg))
    built = build_stage(stage, cfg, inputs)
    start = _start_epoch(stage_dir / "checkpoints" / "last.pt")
    _log_attempt(stage_dir, start, world_size=0)
    report = _reporter(mlflow, rank=0, world=1, ray_report=None)
    return fit(built.task, built.train_loader, built.train_cfg, stage_dir,
               built.evaluate if evaluate else None, report=report, on_progress=progress)


def fit_on_ray(stage, cfg: ExperimentConfig, stage_dir: Path, inputs: dict[str, str],
               run_name: str, storage_path: str | Path, mlflow=None,
               evaluate: bool = True, callbacks: list | None = None,
               progress=None) -> FitResult:
    """``callbacks``: Ray Train callbacks, e.g. Tune's TuneReportCallback in a sweep trial;
    ``progress``: called here with the rank-0 worker's progress events (a Ray queue carries
    them from whichever node the worker runs on)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kdray.orchestration.cluster import check_storage
    ensure_ray()
    storage = _storage(storage_path)
    check_storage(storage)  # before any training
    gpu = _use_gpu(cfg)
    _note_batch_stats(stage.model(cfg), cfg.ray.num_workers, gpu)
    resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    threads = max(1, int(cfg.ray.cpus_per_worker))
    loop_config = {"stage": stage, "run_name": run_name, "cfg": to_dict(cfg),
                   "inputs": dict(inputs),
                   "stage_dir": str(stage_dir),
                   "evaluate": evaluate, "threads": threads, "progress": None}
    trainer = TorchTrainer(
        _worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks))
    with _forwarded(progress, mlflow, cfg.ray.num_workers, stage_dir) as queue, \
            _env_defaults(CONTROLLER_POLL):
        loop_config["progress"] = queue
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage.name}: Ray Train finished without a checkpoint")
    ckpt_dir = stage_dir / "checkpoints"
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    result.checkpoint.to_directory(str(ckpt_dir))
    history = load_checkpoint(ckpt_dir / "last.pt")["history"]
    write_outputs(stage_dir, history)
    return FitResult(metrics=history[-1] if history else {}, history=history,
                     checkpoint=ckpt_dir / "last.pt")


@contextlib.contextmanager
def _env_defaults(values: dict[str, str]):
    """``values`` in this process's environment for the block, where the user set none."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def _forwarded(progress, mlflow, world: int, stage_dir: Path):
    """A Ray queue that the rank-0 worker puts its events on, drained by a thread on the driver
    while the trainer runs: each worker start goes to ``stage_dir/attempts.jsonl`` (written
    here: the stage dir need not exist on the worker's node), ``progress`` renders the progress
    events and each epoch's metrics go to the MLflow run ``mlflow = (uri, run_id)`` from here.
    Workers never write to MLflow, so the tracking store need only be reachable from the
    driver (a server on 127.0.0.1, a sqlite file). The queue's actor lives on the driver's
    node, so that losing a worker node mid-stage does not lose it."""
    from kdray.orchestration.cluster import on_driver_node
    from kdray.orchestration.tracking import log_metrics, numeric

    def handle(event: dict) -> None:
        if event.get("kind") == "attempt":
            _log_attempt(stage_dir, **event["attempt"])
            return
        if progress is not None:
            progress(event)
        if mlflow and event.get("kind") == "epoch":
            metrics = numeric(event["metrics"])
            if "throughput" in metrics:  # every rank trains as many samples as rank 0
                metrics["throughput_total"] = metrics["throughput"] * world
            log_metrics(mlflow[0], mlflow[1], metrics, step=int(metrics.get("epoch", 0)))

    from ray.util.queue import Empty, Queue
    queue = Queue(actor_options={"num_cpus": 0, **on_driver_node()})
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set() or not queue.empty():
            try:
                event = queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:   # the queue's actor is gone (Ray shutting down): stop here;
                return          # the driver logs the whole history after fit() anyway
            handle(event)

    thread = threading.Thread(target=drain, name="kdray-progress", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        stop.set()
        thread.join(timeout=10)
        queue.shutdown()


_noted_cpu_bn = False


def _note_batch_stats(model, world: int, gpu: bool) -> None:
    """Say once per process that CPU workers keep per-rank BatchNorm statistics:
    ``torch.nn.SyncBatchNorm`` runs on CUDA only (it raises on CPU tensors)."""
    global _noted_cpu_bn
    if world < 2 or gpu or model.freeze_bn or model.sync_bn == "off" or _noted_cpu_bn:
        return
    from kdray.console import log
    log(f"note: model.sync_bn={model.sync_bn} but SyncBatchNorm needs CUDA; the {world} CPU "
        f"workers keep per-rank BatchNorm statistics (model.freeze_bn=true keeps them fixed)")
    _noted_cpu_bn = True


def _sync_bn(task: torch.nn.Module, model, world: int, device: torch.device):
    """SyncBatchNorm (statistics over the global batch) for 2+ CUDA workers unless
    ``model.sync_bn=off``; frozen statistics (``model.freeze_bn``) need no syncing."""
    if world < 2 or device.type != "cuda" or model.sync_bn == "off" or model.freeze_bn:
        return task
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(task)


def _storage(path: str | Path) -> str:
    """Ray's storage: a local/shared folder (made absolute) or a URI such as ``s3://b/p``."""
    text = str(path)
    return text if "://" in text else str(Path(text).resolve())


# ----------------------------------------------------------------------------- on the workers

def _worker(config: dict) -> None:
    """One Ray Train worker: build, prepare for this rank, resume, fit, report per epoch."""
    import ray.train
    import ray.train.torch

    from kdray.data.dataset import make_loader
    from kdray.eval.runner import make_evaluator
    from kdray.stage_run import build_stage
    from kdray.train import fast_paths

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    cfg = from_dict(config["cfg"], "<ray worker>")
    seed_everything(config["stage"].seed(cfg))
    built = build_stage(config["stage"], cfg, config["inputs"])
    t = built.train_cfg
    device = ray.train.torch.get_device()
    # The global batch stays cfg.batch_size: each rank takes its share of SeededSampler's order.
    loader = make_loader(built.train_loader.dataset, max(1, t.batch_size // world), True,
                         cfg.data.num_workers, t.seed, rank=rank, world_size=world,
                         mp_context=LOADER_START)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
    # Each rank scores its shard of the val set; rank 0 gathers and runs pycocotools once.
    val = built.val_loader
    evaluate = make_evaluator(make_loader(val.dataset, val.batch_size, False,
                                          cfg.data.num_workers, t.seed, rank=rank,
                                          world_size=world, mp_context=LOADER_START),
                              built.val, t.flip_test)
    task = _sync_bn(built.task, config["stage"].model(cfg), world, device).to(device)
    if fast_paths(t, device).channels_last:
        task.to(memory_format=torch.channels_last)  # before DDP builds its gradient buckets
    task = ray.train.torch.prepare_model(
        task, move_to_device=device,
        parallel_strategy_kwargs={"find_unused_parameters": True})  # e.g. an unused KD term
    # Node-local scratch for fit's own files; named by run and rank, so a worker group that
    # replaces a crashed one clears what the crashed worker left.
    scratch = Path(tempfile.gettempdir()) / f"kdray-{config['run_name']}-r{rank}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        resume = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            resume = Path(checkpoint.to_directory(str(scratch / "resume"))) / "last.pt"
        queue = config["progress"]
        if rank == 0:  # the driver appends it to the stage dir's attempts.jsonl
            queue.put({"kind": "attempt", "attempt": {
                "start_epoch": _start_epoch(resume), "world_size": world,
                "node": ray.get_runtime_context().get_node_id(), "scratch": str(scratch)}})
        report = _reporter(None, rank, world, ray.train.report)
        fit(task, loader, t, scratch / "out" if rank == 0 else None,
            evaluate if config["evaluate"] else None,
            report=report, resume_from=resume, is_main=rank == 0, device=device,
            on_progress=queue.put_nowait if rank == 0 else None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _reporter(mlflow, rank: int, world: int, ray_report):
    """The ``report(metrics, ckpt_dir)`` callback for fit: MLflow (in-process stages only; a
    Ray worker's metrics reach MLflow through the driver, :func:`_forwarded`), then Ray."""
    def report(metrics: dict, ckpt_dir: str | None) -> None:
        epoch = int(metrics.get("epoch", 0))
        from kdray.orchestration.tracking import log_metrics, numeric
        clean = numeric(metrics)
        if "throughput" in clean:  # every rank trains as many samples as rank 0
            clean["throughput_total"] = clean["throughput"] * world
        if rank == 0 and mlflow:
            log_metrics(mlflow[0], mlflow[1], clean, step=epoch)
        if ray_report is not None:
            from ray.train import Checkpoint
            ray_report(clean, checkpoint=Checkpoint.from_directory(ckpt_dir) if ckpt_dir
                       else None)
    return report


def _start_epoch(checkpoint: Path | None) -> int:
    if checkpoint is None or not Path(checkpoint).exists():
        return 1
    return int(load_checkpoint(checkpoint)["epoch"]) + 1


def _log_attempt(stage_dir: Path, start_epoch: int, world_size: int, **where) -> None:
    """One line per start of the stage's training: the epoch it starts at and, for a Ray
    worker group, rank 0's node id and scratch dir (``where``)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    with open(stage_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "start_epoch": start_epoch,
                            "world_size": world_size, "pid": os.getpid(), **where}) + "\n")


def read_attempts(stage_dir: str | Path) -> list[dict]:
    path = Path(stage_dir) / "attempts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
