"""PyTorch side of the cross-entropy op: the naive oracle, and the chunk steps of the CPU path.

The oracle (`masked_cross_entropy_reference`, `fused_linear_cross_entropy_reference`) materialises the
N x V logits and lets autograd differentiate F.cross_entropy: it is what the tests compare against, in
float64. The CPU path of the public op runs `chunk_logits_grad_torch` per token chunk inside the same
autograd.Function as the Triton path, so it never holds more than one chunk of logits either.

Options (`LossOptions`; the oracle takes them as keyword arguments): with z = softcap(logit_scale * x),
softcap(y) = c * tanh(y / c) (Gemma2's final-logit soft-capping), lse = logsumexp(z), eps = label_smoothing,
the per-token loss of a valid token is torch's smoothed cross-entropy plus the z-loss,
    l_i = lse - (1 - eps) * z_y - (eps / V) * sum_j z_j + z_loss * lse^2,
and its logits gradient (1 + 2 z_loss lse) softmax(z) - (1 - eps) onehot(y) - eps / V, times
dz/dx = logit_scale * (1 - (z / c)^2). A token is correct when its target z_y equals its row max (ties
count as correct; argmax(z) = argmax(x): both transforms are increasing).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

REDUCTIONS = ("token_mean", "task_mean", "sum", "none")


class CrossEntropyOutput(NamedTuple):
    loss: torch.Tensor  # scalar fp32; [N] per-token losses for reduction="none" (0 where ignored)
    task_loss_sum: torch.Tensor  # [K] fp32, sum of unscaled per-token losses (z-loss included) per task
    task_token_count: torch.Tensor  # [K] fp32, valid tokens per task
    z_loss: Optional[torch.Tensor] = None  # the z-loss part of `loss`, reduced as `loss` is (no gradient)
    task_correct_count: Optional[torch.Tensor] = None  # [K] fp32, valid tokens whose argmax logit is the label


class LossOptions(NamedTuple):
    """The logit transforms and loss terms of the module docstring; the defaults are the plain loss."""
    label_smoothing: float = 0.0
    z_loss: float = 0.0  # coefficient of lse^2
    softcap: float = 0.0  # 0: no soft-capping
    logit_scale: float = 1.0

    @property
    def extra(self) -> bool:
        """Whether the gradient has the smoothing / z-loss terms (else the plain formula, bit for bit)."""
        return self.label_smoothing != 0.0 or self.z_loss != 0.0


def check_options(label_smoothing: float, z_loss: float, softcap, logit_scale) -> LossOptions:
    """LossOptions from the public keywords; None means off for softcap and logit_scale."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")
    if logit_scale is not None and not logit_scale > 0:
        raise ValueError(f"logit_scale must be > 0 (or None), got {logit_scale}")
    return LossOptions(float(label_smoothing), float(z_loss), float(softcap or 0.0),
                       1.0 if logit_scale is None else float(logit_scale))


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
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
) -> CrossEntropyOutput:
    """The oracle: cross-entropy of logits [N, V] (in fp32, or fp64 for fp64 logits), reduced per task, the
    options by torch's own definitions (F.cross_entropy's label_smoothing, torch.tanh)."""
    check_reduction(reduction, token_scale)
    check_options(label_smoothing, z_loss, softcap, logit_scale)
    K = num_tasks_of(task_ids, num_tasks, task_weights)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index
    z = logits.to(acc)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    ce = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    zl = torch.where(valid, z_loss * torch.logsumexp(z, dim=1) ** 2, 0.0)
    ce = ce + zl
    tasks = torch.zeros_like(labels) if task_ids is None else torch.where(valid, task_ids, 0)
    target = z.gather(1, labels.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
    hit = (valid & (target >= z.amax(dim=1))).float()
    correct = torch.zeros(K, dtype=torch.float32, device=logits.device).index_add(0, tasks, hit)
    task_sum = torch.zeros(K, dtype=acc, device=logits.device).index_add(0, tasks, ce)
    count = torch.zeros(K, dtype=torch.float32, device=logits.device).index_add(0, tasks, valid.float())

    def reduce(t):
        if reduction == "none":
            return t
        if reduction == "token_mean":
            return t.sum() / count.sum().clamp(min=1)
        if reduction == "sum":
            return t.sum() if token_scale is None else (t * token_scale.to(acc)).sum()
        per_task = torch.zeros(K, dtype=acc, device=logits.device).index_add(0, tasks, t)
        return (task_mean_scales(count.to(acc), task_weights) * per_task).sum()

    return CrossEntropyOutput(reduce(ce), task_sum.detach(), count, reduce(zl).detach(), correct)


def fused_linear_cross_entropy_reference(hidden, weight, labels, task_ids=None, *, bias=None, **kwargs):
    """The oracle of the fused op: logits = hidden @ weight.T (+ bias), then masked_cross_entropy_reference."""
    return masked_cross_entropy_reference(F.linear(hidden, weight, bias), labels, task_ids, **kwargs)


class RowStats(NamedTuple):
    """Per-row statistics of one chunk's (transformed) logits z, fp32 [C] each."""
    lse: torch.Tensor
    target: torch.Tensor  # z_y (meaningless where the label is not in [0, V))
    row_max: torch.Tensor
    row_sum: Optional[torch.Tensor]  # sum_j z_j, only with label smoothing


def token_loss(stats: RowStats, V: int, opts: LossOptions) -> torch.Tensor:
    """l_i of the module docstring from the row statistics (the plain ce = lse - z_y when no option is on)."""
    if not opts.extra:
        return stats.lse - stats.target
    eps = opts.label_smoothing
    loss = stats.lse - (1.0 - eps) * stats.target + opts.z_loss * stats.lse * stats.lse
    return loss - (eps / V) * stats.row_sum if eps else loss


def grad_coefficients(lse, row_scale, V: int, opts: LossOptions):
    """(a, b, c) with grad_z = a * softmax - b * onehot - c per row, for the smoothing / z-loss terms."""
    a = row_scale * (1.0 + 2.0 * opts.z_loss * lse)
    return a, row_scale * (1.0 - opts.label_smoothing), row_scale * (opts.label_smoothing / V)


def chunk_logits_grad_torch(hidden, weight, bias, labels, row_scale, want_grad: bool,
                            opts: LossOptions = LossOptions()):
    """One token chunk on the CPU path: RowStats and, if wanted, the logits gradient (the module docstring,
    row_scale times it; the plain case row_scale * (softmax - onehot)) [C, V] in hidden's dtype, with respect
    to hidden @ W^T + b (logit_scale is the caller's, folded into hidden and bias). Works in place on one
    [C, V] fp32 buffer (two with softcap and gradients). Rows whose label is not in [0, V) get meaningless
    statistics: the caller drops them (ignored tokens, row_scale 0) or makes them NaN (cross_entropy.out_of_range)."""
    logits = F.linear(hidden, weight, bias).float()
    V = logits.shape[1]
    slope = None
    if opts.softcap:
        logits = logits.div_(opts.softcap).tanh_()
        if want_grad:
            slope = 1.0 - logits * logits  # d softcap / dx, from tanh before it is scaled
        logits = logits.mul_(opts.softcap)
    safe = labels.clamp(0, V - 1).unsqueeze(1)
    target = logits.gather(1, safe).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    row_sum = logits.sum(dim=1) if opts.label_smoothing else None
    exp = logits.sub_(row_max).exp_()
    sum_exp = exp.sum(dim=1)
    stats = RowStats(row_max.squeeze(1) + sum_exp.log(), target, row_max.squeeze(1), row_sum)
    if not want_grad:
        return stats, None
    if opts.extra:
        a, b, c = grad_coefficients(stats.lse, row_scale, V, opts)
        grad = exp.mul_((a / sum_exp).unsqueeze(1)).sub_(c.unsqueeze(1))
        grad.scatter_add_(1, safe, -b.unsqueeze(1))
    else:
        grad = exp.mul_((row_scale / sum_exp).unsqueeze(1))
        grad.scatter_add_(1, safe, -row_scale.unsqueeze(1))
    if slope is not None:
        grad.mul_(slope)
    return stats, grad.to(hidden.dtype)


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
