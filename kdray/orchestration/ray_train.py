"""Run one stage on Ray Train workers (TorchTrainer), or in-process with ``ray.num_workers: 0``.

The per-worker function only builds the stage (kdray.stages.build_stage), prepares the model
and the loader for this rank (``prepare_model``, ``prepare_data_loader``) and calls the plain
:func:`kdray.train.fit` with a report callback: each epoch rank 0 logs the metrics to the
stage's MLflow run and hands Ray the epoch's checkpoint (``ray.train.report`` is a barrier, so
every rank calls it; only rank 0 writes and evaluates). Failures and restarts:

- a worker dies: ``FailureConfig(max_failures)`` starts a new worker group that resumes from
  the latest reported checkpoint (``ray.train.get_checkpoint()``);
- the driver dies: rerunning with the same ``RunConfig(name, storage_path)`` (the stage key)
  restores the run and resumes the same way (PITFALLS.md: Ray Train V2).

Each worker start is appended to ``<stage_dir>/attempts.jsonl`` (the epoch it starts at), so
a resume is visible. The worker's own files live in a scratch dir; the driver copies the final
checkpoint into the stage dir and writes metrics.json and loss_curve.png from its history.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kdray.config import ExperimentConfig, from_dict, to_dict, with_overrides
from kdray.train import FitResult, fit, load_checkpoint, seed_everything, write_outputs

# Fault injection for the fault-tolerance tests and drills, read on the driver: when the
# rank-0 worker reaches the report of epoch $KDRAY_FAULT_AT_EPOCH (of stage $KDRAY_FAULT_STAGE,
# if set) it exits hard (os._exit; KDRAY_FAULT_ACTION=exit) or hangs (=hang, so the driver can
# be killed at a known point), once: the file $KDRAY_FAULT_MARKER remembers that it happened.
FAULT_ENV = {"epoch": "KDRAY_FAULT_AT_EPOCH", "stage": "KDRAY_FAULT_STAGE",
             "action": "KDRAY_FAULT_ACTION", "marker": "KDRAY_FAULT_MARKER"}


_started_ray = False


def ensure_ray() -> None:
    """Connect to ``$RAY_ADDRESS`` (a ``ray job`` sets it) or start a local Ray, on first use.

    Without ``RAY_ADDRESS`` a fresh local instance is started (``address="local"``), never
    somebody else's cluster that happens to run on this machine. A Ray that the caller
    initialised (tests, notebooks) is used as it is.
    """
    global _started_ray
    import ray
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address)  # a local dashboard binds 127.0.0.1 (Train's state API needs it)
    _started_ray = True


def shutdown_ray() -> None:
    """Stop the Ray that :func:`ensure_ray` started (none else)."""
    global _started_ray
    if _started_ray:
        import ray
        ray.shutdown()
        _started_ray = False


def train_seed(stage: str, cfg: ExperimentConfig) -> int:
    """The stage's seed. The networks are seeded before they are built, so the initial weights
    do not depend on what ran earlier in the process (a Ray worker vs the plain loop)."""
    from kdray.stages import stage_config
    scfg = stage_config(stage, cfg)
    return getattr(scfg, "train", scfg).seed


def _use_gpu(cfg: ExperimentConfig) -> bool:
    if cfg.ray.use_gpu != "auto":
        return cfg.ray.use_gpu == "yes"
    import ray
    return ray.cluster_resources().get("GPU", 0) > 0


def train_stage(stage: str, cfg: ExperimentConfig, stage_dir: str | Path, inputs: dict[str, str],
                run_name: str, storage_path: str | Path, mlflow: tuple[str, str] | None = None,
                evaluate: bool = True) -> FitResult:
    """Fit one stage: in-process when ``cfg.ray.num_workers == 0``, else on Ray Train.

    ``stage_dir`` ends up holding checkpoints/last.pt, metrics.json, loss_curve.png,
    config.yaml; ``mlflow = (tracking_uri, run_id)`` receives per-epoch metrics (step = epoch).
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "config.yaml").write_text(__import__("yaml").safe_dump(to_dict(cfg),
                                                                         sort_keys=False))
    if cfg.ray.num_workers == 0:
        return _fit_in_process(stage, cfg, stage_dir, inputs, mlflow, evaluate)
    return fit_on_ray(stage, cfg, stage_dir, inputs, run_name, storage_path, mlflow, evaluate)


def _fit_in_process(stage, cfg, stage_dir, inputs, mlflow, evaluate) -> FitResult:
    """The plain loop; it resumes from ``stage_dir/checkpoints/last.pt`` by itself."""
    from kdray.stages import build_stage
    seed_everything(train_seed(stage, cfg))
    built = build_stage(stage, cfg, inputs)
    start = _start_epoch(stage_dir / "checkpoints" / "last.pt")
    _log_attempt(stage_dir, start, world_size=0)
    report = _reporter(mlflow, rank=0, world=1, fault=_fault_from_env(stage), ray_report=None)
    return fit(built.task, built.train_loader, built.train_cfg, stage_dir,
               built.evaluate if evaluate else None, report=report)


def fit_on_ray(stage: str, cfg: ExperimentConfig, stage_dir: Path, inputs: dict[str, str],
               run_name: str, storage_path: str | Path, mlflow=None,
               evaluate: bool = True, callbacks: list | None = None) -> FitResult:
    """``callbacks``: Ray Train callbacks, e.g. Tune's TuneReportCallback in a sweep trial."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray()
    gpu = _use_gpu(cfg)
    resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    threads = max(1, int(cfg.ray.cpus_per_worker))
    loop_config = {"stage": stage, "run_name": run_name, "cfg": to_dict(cfg),
                   "inputs": dict(inputs),
                   "stage_dir": str(stage_dir), "mlflow": list(mlflow) if mlflow else None,
                   "evaluate": evaluate, "threads": threads, "fault": _fault_from_env(stage)}
    trainer = TorchTrainer(
        _worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=_storage(storage_path),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage}: Ray Train finished without a checkpoint")
    ckpt_dir = stage_dir / "checkpoints"
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    result.checkpoint.to_directory(str(ckpt_dir))
    history = load_checkpoint(ckpt_dir / "last.pt")["history"]
    write_outputs(stage_dir, history)
    return FitResult(metrics=history[-1] if history else {}, history=history,
                     checkpoint=ckpt_dir / "last.pt")


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
    from kdray.stages import build_stage
    from kdray.train import fast_paths

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    cfg = from_dict(config["cfg"], "<ray worker>")
    seed_everything(train_seed(config["stage"], cfg))
    built = build_stage(config["stage"], cfg, config["inputs"])
    t = built.train_cfg
    device = ray.train.torch.get_device()
    # The global batch stays cfg.batch_size: each rank takes its share of SeededSampler's order.
    loader = make_loader(built.train_loader.dataset, max(1, t.batch_size // world), True,
                         cfg.data.num_workers, t.seed, rank=rank, world_size=world)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
    task = built.task.to(device)
    if fast_paths(t, getattr(task, "backbone", ""), device).channels_last:
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
        if rank == 0:
            _log_attempt(Path(config["stage_dir"]), _start_epoch(resume), world)
        report = _reporter(config["mlflow"], rank, world, config["fault"], ray.train.report)
        fit(task, loader, t, scratch / "out" if rank == 0 else None,
            built.evaluate if (rank == 0 and config["evaluate"]) else None,
            report=report, resume_from=resume, is_main=rank == 0, device=device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _reporter(mlflow, rank: int, world: int, fault: dict | None, ray_report):
    """The ``report(metrics, ckpt_dir)`` callback for fit: MLflow (rank 0), then Ray."""
    last_report = time.monotonic()

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        nonlocal last_report
        epoch = int(metrics.get("epoch", 0))
        _maybe_fault(fault, epoch, rank, last_report)
        from kdray.orchestration.tracking import log_metrics, numeric, warn
        clean = numeric(metrics)
        if "throughput" in clean:  # every rank trains as many samples as rank 0
            clean["throughput_total"] = clean["throughput"] * world
        if rank == 0 and mlflow:
            try:
                log_metrics(mlflow[0], mlflow[1], clean, step=epoch)
            except Exception as e:  # e.g. a sqlite store this node cannot reach: the driver
                warn(f"epoch {epoch}: MLflow logging failed on the worker ({e}); "
                     f"the driver logs the history at the end")
        if ray_report is not None:
            from ray.train import Checkpoint
            ray_report(clean, checkpoint=Checkpoint.from_directory(ckpt_dir) if ckpt_dir
                       else None)
        last_report = time.monotonic()
    return report


def _fault_from_env(stage: str) -> dict | None:
    spec = {k: os.environ.get(v, "") for k, v in FAULT_ENV.items()}
    if not spec["epoch"] or spec["stage"] not in ("", stage):
        return None
    return {"epoch": int(spec["epoch"]), "action": spec["action"] or "exit",
            "marker": spec["marker"]}


# Ray's controller picks up a reported checkpoint on its next poll of the workers (every 2 s,
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a fault injected sooner after the previous report would
# test "crashed before the checkpoint was registered" instead of "crashed mid-epoch".
FAULT_SETTLE_S = 10.0


def _maybe_fault(fault: dict | None, epoch: int, rank: int, last_report: float = 0.0) -> None:
    if not fault or rank != 0 or epoch != fault["epoch"]:
        return
    time.sleep(max(0.0, last_report + FAULT_SETTLE_S - time.monotonic()))
    marker = Path(fault["marker"]) if fault["marker"] else None
    if marker is not None:
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{fault['action']} at epoch {epoch}, pid {os.getpid()}\n")
    if fault["action"] == "hang":
        while True:
            time.sleep(60)
    os._exit(17)


def _start_epoch(checkpoint: Path | None) -> int:
    if checkpoint is None or not Path(checkpoint).exists():
        return 1
    return int(load_checkpoint(checkpoint)["epoch"]) + 1


def _log_attempt(stage_dir: Path, start_epoch: int, world_size: int) -> None:
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
        with open(stage_dir / "attempts.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "start_epoch": start_epoch,
                                "world_size": world_size, "pid": os.getpid()}) + "\n")
    except OSError:  # a worker node without the shared stage dir: informative only
        pass


def read_attempts(stage_dir: str | Path) -> list[dict]:
    path = Path(stage_dir) / "attempts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- throughput

def throughput_probe(stage: str, cfg: ExperimentConfig, inputs: dict[str, str],
                     workdir: str | Path, persons: int = 256, workers: int = 2) -> dict:
    """Training images/s of the plain loop (all cores in one process) vs Ray Train
    (``workers`` workers of one CPU each) on the same data, no evaluation; the second of two
    epochs is timed so one-off warm-up (oneDNN kernels, loader start) is left out."""
    workdir = Path(workdir)
    probe = with_overrides(cfg, {"data.max_train": persons, "ray.num_workers": workers,
                                 "ray.cpus_per_worker": 1.0, "ray.max_failures": 0})
    probe = _with_epochs(stage, probe, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        plain = _fit_in_process(stage, with_overrides(probe, {"ray.num_workers": 0}),
                                workdir / "plain", inputs, None, evaluate=False)
    finally:
        torch.set_num_threads(threads)
    ray_res = fit_on_ray(stage, probe, workdir / "ray", inputs, f"probe-{time.time_ns()}",
                         workdir / "ray_storage", None, evaluate=False)
    p = plain.history[-1]["throughput"]
    r = ray_res.history[-1]["throughput"] * workers
    shutil.rmtree(workdir, ignore_errors=True)
    return {"throughput_plain": p, "throughput_ray": r, "ray_vs_plain_throughput": r / p,
            "probe_stage": stage, "probe_workers": workers}


def _with_epochs(stage: str, cfg: ExperimentConfig, epochs: int) -> ExperimentConfig:
    key = {"teacher": "teacher.train.epochs", "student": "student.train.epochs",
           "gcn": "tsd.stage2.train.epochs", "cdkd": "cdkd.student.train.epochs"}[stage]
    return with_overrides(cfg, {key: epochs})
