"""MFT loss weighting on top of the cross-entropy op, normalised over a whole optimizer step.

MFTCoder computes case3 per micro-batch and averages over ranks; we count each task's loss tokens over
all micro-batches (and ranks) of the step first, then give every token the scale
c_i = w_t / (n_t * sum_{t present} w_t), so that sum_i c_i * ce_i over the step is exactly case3 of the
whole step: gradient accumulation and data parallelism change nothing.
"""

from __future__ import annotations

import torch

from mftcore.data.batch import IGNORE_INDEX


def step_token_scales(batches, mode: str, num_tasks: int, weights=None):
    """Per-token loss scales for each micro-batch of one optimizer step, and the per-task counts.

    The one entry point for every weighting mode: the trainer runs each micro-batch with
    reduction="sum" and these scales, so that the step's summed loss is the mode's loss.
    """
    if mode != "case3":
        raise ValueError(f"weighted_loss_mode {mode!r} is not implemented")
    counts = count_task_tokens(batches, num_tasks)
    scales = task_scales(counts, weights)
    return [token_scale(b.labels.flatten(), b.task_ids.flatten(), scales) for b in batches], counts


def count_task_tokens(batches, num_tasks: int) -> torch.Tensor:
    """Loss tokens per task over the micro-batches of one step, fp32 [K] on the batches' device."""
    counts = None
    for b in batches:
        valid = b.labels != IGNORE_INDEX
        c = torch.zeros(num_tasks, dtype=torch.float32, device=b.labels.device)
        c.index_add_(0, torch.where(valid, b.task_ids, 0).flatten(), valid.flatten().float())
        counts = c if counts is None else counts + c
    return counts


def task_scales(counts: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """case3 per-task scale w_t / (n_t * sum_{t present} w_t); 0 for a task with no tokens."""
    w = torch.ones_like(counts) if weights is None else weights.to(counts)
    present_w = torch.where(counts > 0, w, 0.0)
    return present_w / (counts.clamp(min=1) * present_w.sum().clamp(min=1e-12))


def token_scale(labels: torch.Tensor, task_ids: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-token scale for reduction="sum": the token's task scale, 0 where there is no loss."""
    valid = labels != IGNORE_INDEX
    return torch.where(valid, scales[torch.where(valid, task_ids, 0)], 0.0)
