"""PyTorch side of the cross-entropy op: the naive oracle, and the chunk steps of the CPU path.

The oracle (`masked_cross_entropy_reference`, `fused_linear_cross_entropy_reference`) materialises the
N x V logits and lets autograd differentiate F.cross_entropy: it is what the tests compare against, in
float64. The CPU path of the public op runs `chunk_logits_grad_torch` per token chunk inside the same
autograd.Function as the Triton path, so it never holds more than one chunk of logits either.
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


def check_reduction(reduction: str, token_scale) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if token_scale is not None and reduction != "sum":
        raise ValueError("token_scale is only used with reduction='sum'")


def num_tasks_of(task_ids, num_tasks, task_weights) -> int:
    if num_tasks is not None:
        return int(num_tasks)
    if task_weights is not None:
        return len(task_weights)
    if task_ids is None:
        return 1
    # Host sync: pass num_tasks to avoid it on a GPU.
    return int(task_ids.max().clamp(min=0)) + 1


def task_mean_scales(counts: torch.Tensor, weights: Union[None, Sequence[float], torch.Tensor] = None) -> torch.Tensor:
    """case3's per-task token scale w_t / (n_t * sum_{t present} w_t), 0 for a task with no tokens, in
    counts' dtype and device: sum_i scale[task_i] * ce_i = sum_t w_t * mean_t / sum_{t present} w_t. The one
    copy of the formula (the op, its oracle, and the trainer's step-wide scales use it)."""
    w = torch.ones_like(counts) if weights is None else torch.as_tensor(weights, dtype=counts.dtype,
                                                                         device=counts.device)
    present_w = torch.where(counts > 0, w, 0.0)
    return present_w / (counts.clamp(min=1) * present_w.sum().clamp(min=1e-12))


def task_mean(task_loss_sum: torch.Tensor, counts: torch.Tensor,
              weights: Union[None, Sequence[float], torch.Tensor] = None) -> torch.Tensor:
    """case3's value from per-task sums and counts, sum_{t present} w_t * mean_t / sum_{t present} w_t:
    the validation loss. The same formula as task_mean_scales, evaluated as a mean of task means (the
    order of operations the validation loss has always been logged with, so its values stay bitwise)."""
    w = torch.ones_like(counts) if weights is None else torch.as_tensor(weights, dtype=counts.dtype,
                                                                         device=counts.device)
    present_w = torch.where(counts > 0, w, 0.0)
    return (present_w * (task_loss_sum / counts.clamp(min=1))).sum() / present_w.sum().clamp(min=1e-12)


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
    """The oracle: cross-entropy of logits [N, V] (in fp32, or fp64 for fp64 logits), reduced per task."""
    check_reduction(reduction, token_scale)
    K = num_tasks_of(task_ids, num_tasks, task_weights)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index
    ce = F.cross_entropy(logits.to(acc), labels, ignore_index=ignore_index, reduction="none")
    tasks = torch.zeros_like(labels) if task_ids is None else torch.where(valid, task_ids, 0)
    task_sum = torch.zeros(K, dtype=acc, device=logits.device).index_add(0, tasks, ce)
    count = torch.zeros(K, dtype=torch.float32, device=logits.device).index_add(0, tasks, valid.float())
    if reduction == "token_mean":
        loss = ce.sum() / count.sum().clamp(min=1)
    elif reduction == "sum":
        loss = ce.sum() if token_scale is None else (ce * token_scale.to(acc)).sum()
    else:
        loss = (task_mean_scales(count.to(acc), task_weights) * task_sum).sum()
    return CrossEntropyOutput(loss, task_sum.detach(), count)


def fused_linear_cross_entropy_reference(hidden, weight, labels, task_ids=None, *, bias=None, **kwargs):
    """The oracle of the fused op: logits = hidden @ weight.T (+ bias), then masked_cross_entropy_reference."""
    return masked_cross_entropy_reference(F.linear(hidden, weight, bias), labels, task_ids, **kwargs)


def chunk_logits_grad_torch(hidden, weight, bias, labels, row_scale, want_grad: bool):
    """One token chunk on the CPU path: ce [C] fp32 and, if wanted, the logits gradient
    row_scale * (softmax - onehot) [C, V] in hidden's dtype. Works in place on one [C, V] fp32 buffer.
    Rows whose label is not in [0, V) get a meaningless ce: the caller drops it (ignored tokens, row_scale
    0) or makes it NaN (a valid token's label out of range: cross_entropy.out_of_range)."""
    logits = F.linear(hidden, weight, bias).float()
    safe = labels.clamp(0, logits.shape[1] - 1).unsqueeze(1)
    target = logits.gather(1, safe).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    exp = logits.sub_(row_max).exp_()
    sum_exp = exp.sum(dim=1)
    ce = row_max.squeeze(1) + sum_exp.log() - target
    if not want_grad:
        return ce, None
    grad = exp.mul_((row_scale / sum_exp).unsqueeze(1))
    grad.scatter_add_(1, safe, -row_scale.unsqueeze(1))
    return ce, grad.to(hidden.dtype)


def logsumexp_rows_torch(logits: torch.Tensor, rows_per_chunk: int) -> torch.Tensor:
    """Row log-sum-exp in fp32 over row chunks, so a bf16 [N, V] never becomes a whole fp32 copy."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, logits.shape[0], rows_per_chunk):
        out[s:s + rows_per_chunk] = torch.logsumexp(logits[s:s + rows_per_chunk].float(), dim=1)
    return out


def softmax_grad_torch(logits, lse, row_scale, labels, out) -> torch.Tensor:
    """out = row_scale * (softmax(logits) - onehot(labels)) in out's dtype; labels outside [0, V) add no onehot."""
    V = logits.shape[1]
    grad = (logits.float() - lse.unsqueeze(1)).exp_().mul_(row_scale.unsqueeze(1))
    inside = (labels >= 0) & (labels < V)
    grad.scatter_add_(1, labels.clamp(0, V - 1).unsqueeze(1), torch.where(inside, -row_scale, 0.0).unsqueeze(1))
    out.copy_(grad)
    return out
