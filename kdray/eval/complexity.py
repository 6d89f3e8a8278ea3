"""Model complexity: parameters and GFLOPs of one forward (docs/methods.md 1.5, "Complexity").

Convention. ``torch.utils.flop_counter.FlopCounterMode`` counts a multiply-accumulate as 2
FLOPs (convolutions, matmuls, linear layers; elementwise ops, BatchNorm, pooling and resizing are
not counted). The pose papers' "GFLOPs" (HRNet, SimCC, TSD's 8.1, CDKD) are what mmcv / fvcore
count, which is one per multiply-accumulate: they are GMACs. So the output names both:

- ``flops``:  FlopCounterMode's count for one image (2 per MAC),
- ``gflops``: flops / 1e9 (true FLOPs),
- ``gmacs``:  flops / 2 / 1e9, the number to compare with the papers' "GFLOPs" column.

Measured here (timm 1.0.31): SimCC HRNet-W32 at 256x192, K=17, k=2.0 -> 32.06M parameters and
7.78 GMACs (15.56 true GFLOPs); the papers give ~31M and 7.7-8.1 "GFLOPs". The extra 0.77M
parameters are timm's last HRNet fusion producing all four branches (the pose HRNet builds only
the 1/4 output; the IGP-GCN needs the 1/8 and 1/16 maps): without them the count is 31.29M, the
SimCC paper's 31.3M (28.54M backbone + 2.75M head).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def complexity(model: nn.Module, input_size: tuple[int, int], batch: int = 1) -> dict:
    """Parameters and FLOPs of ``model`` on one forward of zeros (batch, 3, H, W).

    input_size is (H, W). FLOPs are counted on a batch of ``batch`` images and reported per
    image (the papers' convention). The model runs in eval mode under ``torch.no_grad`` on its own
    device and dtype; its train/eval mode is restored afterwards. Returns a JSON-friendly dict:
    ``params`` (int), ``params_m`` (millions), ``flops`` (int, per image, 2 per MAC),
    ``gflops`` (flops / 1e9), ``gmacs`` (flops / 2e9: the papers' "GFLOPs").
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    h, w = (int(v) for v in input_size)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x = torch.zeros(batch, 3, h, w, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    flops = counter.get_total_flops() // batch
    params = count_parameters(model)
    return {"params": params, "params_m": params / 1e6, "flops": int(flops),
            "gflops": flops / 1e9, "gmacs": flops / 2e9}
