"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math

import torch


def build_optimizer(model, cfg, *, allow_fused: bool = True) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters), unlike MFTCoder.

    Fused AdamW when every trained parameter is a float tensor on a GPU: one kernel per step, and it can
    skip a non-finite step on the device (found_inf), so the loop never waits for the GPU to decide.
    On the CPU the default implementation stays (the fused one rounds differently). allow_fused=False
    for engines that step the optimizer on their own flat buffers (DeepSpeed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = allow_fused and bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             **({"fused": True} if fused else {}))


def build_scheduler(optimizer, cfg, total_steps: int):
    """Linear warmup to learning_rate, then cosine (or linear, or constant) down to min_lr at total_steps."""
    warmup = cfg.num_warmup_steps
    warmup = int(warmup * total_steps) if isinstance(warmup, float) else warmup
    floor = cfg.min_lr / cfg.learning_rate if cfg.learning_rate > 0 else 0.0  # lr 0: evaluation-only runs

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler_type in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.lr_scheduler_type == "linear":
            return 1 - (1 - floor) * progress
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
