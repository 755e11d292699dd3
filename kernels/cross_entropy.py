"""Linear + masked cross-entropy with per-task weighted reduction.

Public API (DESIGN.md, stable):
    fused_linear_cross_entropy(hidden [N,H], weight [V,H], labels [N], task_ids [N] | None, *, bias,
        num_tasks, task_weights, token_scale, reduction, ignore_index) -> CrossEntropyOutput
Reductions: "token_mean" (MFTCoder case1), "task_mean" (case3: sum_t w_t*mean_t / sum_{t present} w_t),
"sum" (sum_i token_scale_i * ce_i, what the trainer uses to normalise over a whole optimizer step).

Status: only the PyTorch reference exists so far, and it materialises the N x V logits; the Triton
kernel (never materialising them) is its own issue and will dispatch here for CUDA tensors.
task_loss_sum and task_token_count are statistics (detached); gradients flow through `loss` only.
Every valid token (label != ignore_index) must carry a task id in [0, num_tasks).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

REDUCTIONS = ("token_mean", "task_mean", "sum")


class CrossEntropyOutput(NamedTuple):
    loss: torch.Tensor  # scalar, fp32
    task_loss_sum: torch.Tensor  # [K] fp32, sum of unscaled ce over each task's valid tokens
    task_token_count: torch.Tensor  # [K] fp32, valid tokens per task


def _num_tasks(task_ids, num_tasks, task_weights) -> int:
    if num_tasks is not None:
        return int(num_tasks)
    if task_weights is not None:
        return len(task_weights)
    if task_ids is None:
        return 1
    # Host sync: pass num_tasks to avoid it on a GPU.
    return int(task_ids.max().clamp(min=0)) + 1


def masked_cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    task_ids: Optional[torch.Tensor] = None,
    *,
    num_tasks: Optional[int] = None,
    task_weights: Union[None, Sequence[float], torch.Tensor] = None,
    token_scale: Optional[torch.Tensor] = None,
    reduction: str = "task_mean",
    ignore_index: int = -100,
) -> CrossEntropyOutput:
    """The oracle: cross-entropy of logits [N, V] (computed in fp32), reduced per task."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if token_scale is not None and reduction != "sum":
        raise ValueError("token_scale is only used with reduction='sum'")
    K = _num_tasks(task_ids, num_tasks, task_weights)
    valid = labels != ignore_index
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    tasks = torch.zeros_like(labels) if task_ids is None else torch.where(valid, task_ids, 0)
    task_sum = torch.zeros(K, dtype=torch.float32, device=logits.device).index_add(0, tasks, ce)
    count = torch.zeros(K, dtype=torch.float32, device=logits.device).index_add(0, tasks, valid.float())
    if reduction == "token_mean":
        loss = ce.sum() / count.sum().clamp(min=1)
    elif reduction == "sum":
        loss = ce.sum() if token_scale is None else (ce * token_scale.float()).sum()
    else:
        w = torch.ones(K, device=logits.device) if task_weights is None else torch.as_tensor(
            task_weights, dtype=torch.float32, device=logits.device)
        present_w = torch.where(count > 0, w, 0.0)
        loss = (present_w * task_sum / count.clamp(min=1)).sum() / present_w.sum().clamp(min=1e-12)
    return CrossEntropyOutput(loss, task_sum.detach(), count)


def fused_linear_cross_entropy_reference(hidden, weight, labels, task_ids=None, *, bias=None, **kwargs):
    """logits = hidden @ weight.T (+ bias), then masked_cross_entropy_reference."""
    return masked_cross_entropy_reference(F.linear(hidden, weight, bias), labels, task_ids, **kwargs)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    task_ids: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    num_tasks: Optional[int] = None,
    task_weights: Union[None, Sequence[float], torch.Tensor] = None,
    token_scale: Optional[torch.Tensor] = None,
    reduction: str = "task_mean",
    ignore_index: int = -100,
) -> CrossEntropyOutput:
    """Cross-entropy of hidden @ weight.T against labels, reduced per task. See the module docstring."""
    return fused_linear_cross_entropy_reference(
        hidden, weight, labels, task_ids, bias=bias, num_tasks=num_tasks, task_weights=task_weights,
        token_scale=token_scale, reduction=reduction, ignore_index=ignore_index)


def masked_cross_entropy(logits, labels, task_ids=None, **kwargs) -> CrossEntropyOutput:
    """For callers that already hold logits [N, V]: the same reductions as the fused op."""
    return masked_cross_entropy_reference(logits, labels, task_ids, **kwargs)
