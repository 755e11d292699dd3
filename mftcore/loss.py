"""The loss modes: one table that says what each `weighted_loss_mode` means, and the per-token scales
that turn the fused cross-entropy's reduction="sum" into the mode's loss of a whole optimizer step.

MFTCoder's modes (utils/loss_utils.py), with ce_i the token loss, n_t the loss tokens of task t, a
sample s = one document of cu_seqlens (padding segments have no loss tokens) with n_s loss tokens,
S_t the samples of task t that have loss tokens, and w the static `task_weights` (case3/case4 only,
as in MFTCoder) or the dynamic per-task weights of self-paced/CoBa:
  case1  sum_i ce_i / sum_t n_t                                          (token mean)
  case2  mean over samples of (sum_{i in s} ce_i / n_s)                  (sample mean)
  case3  sum_t w_t L_t / sum_{t present} w_t,  L_t = sum_{i in t} ce_i / n_t   (default)
  case4  as case3 with L_t = mean over t's samples of their token means
MFTCoder computes them per device micro-batch and averages gradients over ranks. We count tokens and
samples over all micro-batches of the step and all ranks first (one all_reduce of one [2, K] tensor),
then give every token the scale c_i of its mode, so that sum_i c_i * ce_i over the step (over every
rank) is exactly the mode's loss of the whole step: gradient accumulation and data parallelism give
the gradient of one big batch, provided gradients are summed over ranks (not averaged: an engine
that averages, like DDP, multiplies the loss by the world size).

A new mode is one row of LOSS_MODES (and, if its weights change during training, one entry of
mftcore.weighting.WEIGHTINGS); nothing else in mftcore branches on a mode's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist

from mftcore.data.batch import IGNORE_INDEX
from mftcore.kernels import CrossEntropyOutput, fused_linear_cross_entropy, task_mean_scales


@dataclass(frozen=True)
class LossMode:
    name: str
    base: str  # the formula of each step's token scales: case1 .. case4
    weighted: bool  # per-task weights enter the formula (task_weights, or the dynamic ones)
    dynamic: bool  # mftcore.weighting updates the weights from validation-loss slopes during training
    needs_valid: bool  # needs validation data (a valid share in data_split)
    needs_initial: bool  # needs the validation losses measured before the first step


LOSS_MODES = {
    "case1": LossMode("case1", "case1", weighted=False, dynamic=False, needs_valid=False, needs_initial=False),
    "case2": LossMode("case2", "case2", weighted=False, dynamic=False, needs_valid=False, needs_initial=False),
    "case3": LossMode("case3", "case3", weighted=True, dynamic=False, needs_valid=False, needs_initial=False),
    "case4": LossMode("case4", "case4", weighted=True, dynamic=False, needs_valid=False, needs_initial=False),
    "self-paced": LossMode("self-paced", "case3", weighted=True, dynamic=True, needs_valid=True, needs_initial=False),
    # CoBa's convergence scores are ratios to each task's validation loss before training.
    "coba": LossMode("coba", "case3", weighted=True, dynamic=True, needs_valid=True, needs_initial=True),
}
MODE_ALIASES = {"selfpaced": "self-paced"}  # MFTCoder accepts both spellings
BASE_MODES = ("case1", "case2", "case3", "case4")


def loss_mode(name: str) -> LossMode:
    """The table row of a weighted_loss_mode (aliases resolved); KeyError for an unknown name."""
    return LOSS_MODES[MODE_ALIASES.get(name, name)]


def check_base_mode(mode: str, weights) -> None:
    if mode not in BASE_MODES:
        raise ValueError(f"mode {mode!r} is not a base loss mode (choose from {', '.join(BASE_MODES)})")
    if weights is not None and not LOSS_MODES[mode].weighted:
        raise ValueError(f"task weights apply to case3 and case4 only, not {mode}")


def step_token_scales(batches, mode: str, num_tasks: int, weights=None, *, across_ranks: bool = True):
    """Per-token loss scales (flat [B*L] fp32) for each micro-batch of one optimizer step, and the loss
    tokens per task over the step [K] (all ranks).

    The one entry point for every weighting mode: the trainer runs each micro-batch with
    reduction="sum" and these scales, so that the step's summed loss is the mode's loss. `weights` is
    a [K] tensor (or None = all 1), used by case3 and case4 (`mode` is a base mode). With `across_ranks` and torch.distributed
    initialised, the counts are summed over all ranks (one all_reduce); no host synchronisation.
    """
    check_base_mode(mode, weights)
    docs = [document_stats(b.labels, b.task_ids, b.cu_seqlens, num_tasks) for b in batches]
    totals = torch.stack([torch.stack([d.task_tokens, d.task_samples]) for d in docs]).sum(dim=0)
    if across_ranks and dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    counts, samples = totals[0], totals[1]
    return [mode_token_scale(d, counts, samples, mode, weights) for d in docs], counts


def document_stats(labels, task_ids, cu_seqlens, num_tasks: int) -> SimpleNamespace:
    """Per-token document index and validity, loss tokens per document, and per task the loss tokens
    and the documents (samples) that have any. All on the batch's device, without a host sync."""
    labels, task_ids = labels.flatten(), task_ids.flatten()
    T = labels.numel()
    valid = labels != IGNORE_INDEX
    tasks = torch.where(valid, task_ids, 0)
    ends = cu_seqlens[1:].to(device=labels.device, dtype=torch.long)
    doc = torch.searchsorted(ends, torch.arange(T, device=labels.device), right=True)
    n_docs = ends.numel()
    doc_tokens = torch.zeros(n_docs, dtype=torch.float32, device=labels.device).index_add_(0, doc, valid.float())
    doc_task = torch.full((n_docs,), -1, dtype=torch.long, device=labels.device).scatter_reduce_(
        0, doc, torch.where(valid, task_ids, -1), reduce="amax")
    zeros = torch.zeros(num_tasks, dtype=torch.float32, device=labels.device)
    task_tokens = zeros.index_add(0, tasks, valid.float())
    task_samples = zeros.index_add(0, doc_task.clamp(min=0), (doc_tokens > 0).float())
    return SimpleNamespace(valid=valid, tasks=tasks, doc=doc, doc_tokens=doc_tokens,
                           task_tokens=task_tokens, task_samples=task_samples)


def mode_token_scale(d: SimpleNamespace, counts, samples, mode: str, weights=None) -> torch.Tensor:
    """c_i of one micro-batch given the step totals (tokens and samples per task, all ranks)."""
    per_sample = 1.0 / d.doc_tokens.clamp(min=1)[d.doc]
    if mode == "case1":
        scale = torch.ones_like(per_sample) / counts.sum().clamp(min=1)
    elif mode == "case2":
        scale = per_sample / samples.sum().clamp(min=1)
    elif mode == "case3":
        scale = task_mean_scales(counts, weights)[d.tasks]
    else:  # case4: case3's formula over samples instead of tokens, then each sample's token mean
        scale = task_mean_scales(samples, weights)[d.tasks] * per_sample
    return torch.where(d.valid, scale, 0.0)


class MFTLoss(torch.nn.Module):
    """MFTCoder's weighted loss of one batch, through the fused kernel: how other trainers embed ours.

        loss_fn = MFTLoss(num_tasks=3, mode="case3", task_weights=[1.0, 2.0, 1.0])
        out = loss_fn(hidden, model.lm_head.weight, labels, task_ids)  # hidden [B, L, H] or [N, H]
        out.loss.backward()

    labels are aligned with hidden (already shifted: labels[i] is the token after position i), -100
    where there is no loss; task_ids per token ([B, L]) or per row ([B]). Samples for case2/case4 are
    the documents of cu_seqlens, or the rows of a [B, L] batch without it. Each call normalises over its
    own batch on this rank, as MFTCoder does; for an exact optimizer-step normalisation pass the
    `token_scale` of `step_token_scales` over the step's micro-batches. Returns CrossEntropyOutput.
    """

    def __init__(self, num_tasks: int, mode: str = "case3", task_weights=None):
        super().__init__()
        check_base_mode(mode, task_weights)
        self.num_tasks, self.mode = num_tasks, mode
        weights = None if task_weights is None else torch.as_tensor(task_weights, dtype=torch.float32)
        self.register_buffer("task_weights", weights, persistent=False)

    def forward(self, hidden, weight, labels, task_ids, *, bias=None, cu_seqlens=None,
                token_scale=None) -> CrossEntropyOutput:
        if task_ids.dim() == labels.dim() - 1:
            task_ids = task_ids.unsqueeze(-1).expand_as(labels)
        if token_scale is None:
            if cu_seqlens is None:
                rows = labels.shape[0] if labels.dim() == 2 else 1
                cu_seqlens = torch.arange(rows + 1, device=labels.device) * (labels.numel() // rows)
            batch = SimpleNamespace(labels=labels, task_ids=task_ids, cu_seqlens=cu_seqlens)
            (token_scale,), _ = step_token_scales([batch], self.mode, self.num_tasks, self.task_weights,
                                                  across_ranks=False)
        return fused_linear_cross_entropy(
            hidden, weight, labels.reshape(-1), task_ids.reshape(-1), bias=bias, num_tasks=self.num_tasks,
            reduction="sum", token_scale=token_scale.reshape(-1))
