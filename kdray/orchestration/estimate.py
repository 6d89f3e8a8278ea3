"""How long a pipeline will take on this machine, said before the first stage starts.

A few timed training steps (forward, SimCC loss, backward, Adam) and forward passes of each
network at its input size and batch, on random images and in the fast paths training uses
(channels_last on CPU), give seconds per sample on this CPU or GPU. A stage then costs

    epochs x train persons x (its network's train step + the frozen inputs' forward passes
                              + loading one sample)
    + evaluations x val persons x 2 (flip test) x its network's forward pass
    + a fixed start-up (Ray Train's worker group, the loaders, the checkpoints)

and a refinement stage runs its frozen networks once over the training set (the frozen-output
cache, written to Parquet) and then trains only the GCN on it: REFINE_OVERHEAD x that pass. The
constants were fitted to the demo's stages on a 2-core CPU (README, "The demo"): there the
estimate came within 8 % of each stage's wall time and 7 % of the whole run before the GCN's
constant was raised from 5 to 8. It is a guide, shown with "~": the
data loader, other jobs on the machine and the stage cache (a finished stage takes no time) make
the real run differ; the pipeline's last line puts the estimate beside the wall time.
"""
from __future__ import annotations

import time
from functools import lru_cache

from kdray.config import ExperimentConfig, ModelConfig, TrainConfig
from kdray.stages import Refinement, Stage

STARTUP_S = 20.0   # Ray Train start-up, loaders, checkpoints, plots per stage: 17-23 s measured
LOAD_S = 0.5e-3    # one sample read and augmented by the loader process beside the compute
REFINE_OVERHEAD = 8.0   # frozen-output cache (Parquet) + the GCN's epochs, over one forward pass
STEPS = 3          # timed steps per network after one warm-up step


@lru_cache(maxsize=None)
def seconds_per_sample(model: ModelConfig, size: tuple[int, int], t: TrainConfig, train: bool,
                       joints: int) -> float:
    """Median seconds per sample of a training step (``train``) or an inference forward pass
    of ``model`` at ``size`` (H, W) with ``t``'s batch, device and fast paths, on random
    images."""
    import contextlib

    import torch

    from kdray.codecs.simcc import SimCCCodec
    from kdray.losses.simcc import simcc_kl_loss
    from kdray.nn.pose_model import build_pose_model
    from kdray.train import fast_paths, resolve_device
    device = resolve_device(t.device)
    fp = fast_paths(t, device)
    net = build_pose_model(model, SimCCCodec(size), list(range(joints))).to(device)
    images = torch.rand(t.batch_size, 3, *size, device=device)
    if fp.channels_last:
        net, images = net.to(memory_format=torch.channels_last), \
            images.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    net.train(train)
    times = []
    for _ in range(STEPS + 1):
        t0 = time.perf_counter()
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if fp.bf16
               else contextlib.nullcontext())
        if train:
            with amp:
                out = net(images)
            lx, ly = out["logits_x"].float(), out["logits_y"].float()
            loss = simcc_kl_loss(lx, ly, torch.softmax(torch.zeros_like(lx), -1),
                                 torch.softmax(torch.zeros_like(ly), -1),
                                 torch.ones(lx.shape[:2], device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), amp:
                net(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return times[len(times) // 2] / t.batch_size


def _evaluations(epochs: int, every: int) -> int:
    return sum(1 for e in range(1, epochs + 1) if e % every == 0 or e == epochs)


def stage_seconds(stage: Stage, cfg: ExperimentConfig, n_train: int, n_val: int,
                  joints: int = 17, timer=seconds_per_sample) -> float:
    """The expected wall seconds of training ``stage`` under ``cfg`` (see the module doc);
    ``timer(model, size, train_cfg, train, joints)`` gives seconds per sample."""
    t = stage.train(cfg)
    size, full = stage.input_size(cfg), tuple(cfg.data.input_size)
    model = stage.model(cfg)

    def fwd(m: ModelConfig, s) -> float:
        return timer(m, tuple(s), t, False, joints)

    inputs = stage.inputs(cfg)
    teacher_fwd = fwd(cfg.teacher.model, full) if "teacher" in inputs else 0.0
    if isinstance(stage, Refinement):   # frozen outputs once; the GCN's epochs cost little
        train = n_train * (fwd(model, size) + teacher_fwd) * REFINE_OVERHEAD
    else:
        step = timer(model, size, t, True, joints)
        train = t.epochs * n_train * (step + teacher_fwd + LOAD_S)
    evals = _evaluations(t.epochs, t.eval_every) * n_val * 2 * fwd(model, size)
    return STARTUP_S + train + evals


def expected_seconds(plan: list[tuple[Stage, ExperimentConfig]], n_train: int, n_val: int,
                     joints: int = 17) -> list[float]:
    """Seconds per planned stage, in the plan's order."""
    return [stage_seconds(stage, cfg, n_train, n_val, joints) for stage, cfg in plan]
