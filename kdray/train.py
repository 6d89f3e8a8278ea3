"""The plain PyTorch fit loop: runs any task (kdray.tasks) under plain ``python`` on CPU or GPU.

No Ray here: the Ray layer wraps :func:`fit` through its ``report(metrics, checkpoint_dir)``
callback (kdray/orchestration/ray_train.py). Checkpoints are ``state_dict``s plus
optimizer/scheduler/epoch, written atomically and read with ``torch.load(weights_only=True)``;
a resumed run continues at the next epoch with the same results as an uninterrupted one (CPU).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from kdray.config import TrainConfig

Report = Callable[[dict, "str | None"], None]
Evaluate = Callable[[nn.Module], dict]
OnProgress = Callable[[dict], None]   # kdray.progress: step and epoch events


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a kdray checkpoint."""


@dataclass(frozen=True)
class Progress:
    """Where training is: TSD's gamma(t) uses the 1-based epoch, ETHT's reversal strength
    the fraction."""
    epoch: int          # 1-based
    epochs: int
    fraction: float     # in [0, 1], advanced per step


@dataclass
class FitResult:
    metrics: dict                       # last evaluation + last epoch's loss terms
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# Measured on a 2-core AVX512-bf16 CPU (docs/operations.md, bench/RESULTS.md): bf16 autocast speeds
# HRNet training ~2x but slows MobileNetV3 (0.7x), and SimCC training under CPU bf16 autocast
# diverged on SynthPose (KL 6 -> 100+ within two epochs, fp32 converged on the same data), so
# ``auto`` trains in fp32 + channels_last on CPU and in bf16 + channels_last on CUDA.


@dataclass(frozen=True)
class FastPaths:
    bf16: bool
    channels_last: bool
    compile: bool = False


def fast_paths(cfg: TrainConfig, device: torch.device) -> FastPaths:
    """Resolve the ``auto`` choices of precision / channels_last / compile (issue 9,
    bench/fast_paths.py). Host->device copies are ``non_blocking`` from pinned memory
    (make_loader pins when CUDA is available)."""
    if cfg.precision == "auto":
        bf16 = device.type == "cuda"
    else:
        bf16 = cfg.precision == "bf16"
    cl = cfg.channels_last == "on" or cfg.channels_last == "auto"
    comp = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    return FastPaths(bf16=bf16, channels_last=cl, compile=comp)


def compile_pose_models(task: nn.Module) -> int:
    """``Module.compile()`` (in place, state_dict keys unchanged) on every pose network of the
    task (modules with ``backbone_info``); the losses and the Progress argument stay eager so
    a changing ``progress.fraction`` never triggers a recompile. Returns how many."""
    nets = [m for m in task.modules() if hasattr(m, "backbone_info")]
    for m in nets:
        m.compile()
    return len(nets)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step LambdaLR: linear warm-up, then cosine to 0 or multistep decay by epoch."""
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_iters) if cfg.warmup_iters else 1.0
        if cfg.scheduler == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
        epoch = step // max(steps_per_epoch, 1)
        return warm * cfg.lr_gamma ** sum(epoch >= m for m in cfg.milestones)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    """Write then rename, so a crash never leaves a half-written ``last.pt``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle with forbidden globals, random bytes
        raise CheckpointError(f"{path}: not a readable kdray checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a kdray checkpoint (missing field 'model')")
    return state


def _set_epoch(loader, seed: int, epoch: int) -> None:
    """Make each epoch's shuffling and augmentation a function of (seed, epoch) alone."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    gen = getattr(loader, "generator", None)
    if gen is not None:
        gen.manual_seed(seed * 100_003 + epoch)
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- the loop

def fit(task: nn.Module, train_loader, cfg: TrainConfig, out_dir: str | Path | None = None,
        evaluate: Evaluate | None = None, report: Report | None = None,
        resume_from: str | Path | None = None, is_main: bool = True,
        device: torch.device | None = None, on_progress: OnProgress | None = None
        ) -> FitResult:
    """Train ``task`` for ``cfg.epochs``; evaluate every ``cfg.eval_every`` epochs and last.

    ``task(batch, progress)`` returns a dict with ``loss`` and named terms (``task`` may be a
    DDP wrapper: its ``.module`` then answers the other calls);
    ``task.trainable_parameters()`` is what the optimizer updates. ``report(metrics, ckpt_dir)``
    is called once per epoch on every rank (Ray's report is a barrier); ``ckpt_dir`` is None on
    ranks that do not write checkpoints. ``resume_from`` (a checkpoint file or folder) or an
    existing ``out_dir/checkpoints/last.pt`` continues at the next epoch. ``on_progress``
    receives step events (at most every half second) and one event per epoch, on the main
    rank (kdray.progress.ConsoleProgress renders them).
    """
    device = device or resolve_device(cfg.device)
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoints" / "last.pt" if out is not None else None
    seed_everything(cfg.seed)
    core = getattr(task, "module", task)
    task.to(device)
    fp = fast_paths(cfg, device)
    if fp.channels_last:
        task.to(memory_format=torch.channels_last)
    if fp.compile:
        compile_pose_models(core)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=fp.bf16)  # noqa: E731
    params = [p for p in core.trainable_parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    steps = len(train_loader)
    sched = make_scheduler(opt, cfg, steps)
    history: list[dict] = []
    start = 1
    if resume_from is None and ckpt_path is not None and ckpt_path.exists():
        resume_from = ckpt_path
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        core.load_checkpoint_state(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        history, start = list(state["history"]), int(state["epoch"]) + 1
    metrics: dict = history[-1] if history else {}
    for epoch in range(start, cfg.epochs + 1):
        _set_epoch(train_loader, cfg.seed, epoch)
        with autocast():
            terms = _train_epoch(task, train_loader, opt, sched, params, cfg, epoch, device,
                                 on_progress if is_main else None)
        metrics = {"epoch": epoch, **terms}
        if evaluate is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            core.eval()
            with torch.no_grad(), autocast():
                metrics.update({f"val_{k}": v for k, v in evaluate(core).items()})
        metrics.update(core.epoch_metrics() if hasattr(core, "epoch_metrics") else {})
        history.append(metrics)
        if is_main and on_progress is not None:
            on_progress({"kind": "epoch", "epochs": cfg.epochs, "metrics": metrics})
        ckpt_dir = None
        if is_main and ckpt_path is not None:
            save_checkpoint(ckpt_path, {
                "model": core.checkpoint_state(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch, "history": history,
                "torch_rng": torch.get_rng_state(), "meta": getattr(core, "meta", {})})
            ckpt_dir = str(ckpt_path.parent)
        if report is not None:
            report(metrics, ckpt_dir)
    if is_main and out is not None:
        write_outputs(out, history)
    return FitResult(metrics=metrics, history=history, checkpoint=ckpt_path)


PROGRESS_EVERY_S = 0.5


def _train_epoch(task, loader, opt, sched, params, cfg, epoch, device, on_progress) -> dict:
    task.train()
    sums: dict[str, float] = {}
    seen, t0 = 0, time.perf_counter()
    shown = -PROGRESS_EVERY_S
    steps = len(loader)
    for i, batch in enumerate(loader):
        batch = _to_device(batch, device)
        progress = Progress(epoch, cfg.epochs, ((epoch - 1) * steps + i) / (cfg.epochs * steps))
        out = task(batch, progress)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch} step {i}: loss is {loss.item()} "
                                     f"(terms: { {k: float(v) for k, v in out.items() if k.startswith('loss')} })")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        n = len(batch["image"]) if "image" in batch else 1
        seen += n
        for k, v in out.items():
            if k.startswith("loss") and torch.is_tensor(v) and v.ndim == 0:
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
        now = time.perf_counter()
        if on_progress is not None and (now - shown >= PROGRESS_EVERY_S or i == steps - 1):
            shown = now   # the running mean over the epoch so far, not the last batch
            on_progress({"kind": "step", "epoch": epoch, "epochs": cfg.epochs, "step": i,
                      "steps": steps, "loss": sums.get("loss", 0.0) / max(seen, 1),
                      "ips": seen / max(now - t0, 1e-9)})
    dt = time.perf_counter() - t0
    total, sums = all_ranks_sum(seen, sums)
    terms = {k: v / max(total, 1) for k, v in sums.items()}
    terms.update(lr=float(sched.get_last_lr()[0]), throughput=seen / max(dt, 1e-9),
                 epoch_seconds=dt)
    return terms


def all_ranks_sum(seen: int, sums: dict[str, float]) -> tuple[int, dict[str, float]]:
    """The epoch's sample count and per-term loss sums over every data-parallel rank (one
    all-reduce; identity in a single process), so the logged loss is the mean over all ranks'
    samples, as one process on the whole global batch would log it."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return seen, sums
    keys = sorted(sums)   # the same terms on every rank: one order for the flat tensor
    backend_gpu = dist.get_backend() == "nccl"
    flat = torch.tensor([float(seen)] + [sums[k] for k in keys], dtype=torch.float64,
                        device="cuda" if backend_gpu else "cpu")
    dist.all_reduce(flat)
    flat = flat.cpu().tolist()
    return int(flat[0]), dict(zip(keys, flat[1:]))


def write_outputs(out: Path, history: list[dict]) -> None:
    """metrics.json (every epoch) and loss_curve.png (each loss term per epoch)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(
        {"final": history[-1] if history else {}, "history": history}, indent=1))
    from kdray.vis import plot_history
    plot_history(history, out / "loss_curve.png")
