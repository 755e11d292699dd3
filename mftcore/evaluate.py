"""Validation: per-task loss and next-token accuracy over the validation samples, and the small cyclic
sampler that feeds the dynamic weighting modes (self-paced, CoBa) a few validation batches at a time.

Loss and accuracy both come from the fused cross-entropy (never the N x V logits): the op counts, per
task, the loss tokens whose target logit is the row's largest in the same pass that makes the loss.

With several ranks, rank r evaluates batches r, r + W, r + 2W, ... and the sums are all-reduced, so
every rank gets the whole result. Every rank runs the same number of forwards (FSDP2 and ZeRO-3
gather weights in each): a rank with fewer batches runs placeholder batches that have no loss token.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mftcore.data.batch import collate_padded, empty_batch
from mftcore.kernels import task_mean
from mftcore.model.loss_model import as_loss_model
from mftcore.parallel.comm import sum_over_ranks


@dataclass
class EvalResult:
    task_loss_sum: torch.Tensor  # [K] fp32, summed token cross-entropy
    task_token_count: torch.Tensor  # [K] loss tokens
    task_correct: torch.Tensor  # [K] tokens whose argmax is the label

    def task_losses(self) -> list:
        """Token-mean loss per task; None for a task with no tokens here."""
        return [float(s / c) if c > 0 else None
                for s, c in zip(self.task_loss_sum.tolist(), self.task_token_count.tolist())]

    def task_accuracy(self) -> list:
        return [float(r / c) if c > 0 else None
                for r, c in zip(self.task_correct.tolist(), self.task_token_count.tolist())]

    def accuracy(self) -> float:
        return float(self.task_correct.sum() / self.task_token_count.sum().clamp(min=1))

    def combined_loss(self, weights=None) -> float:
        """case3 of the validation set: weighted mean over tasks present of their token-mean loss."""
        return float(task_mean(self.task_loss_sum, self.task_token_count, weights))

    def summed_over_ranks(self) -> "EvalResult":
        return EvalResult(*sum_over_ranks(self.task_loss_sum, self.task_token_count, self.task_correct))


def shard(n: int, rank: int, world_size: int) -> tuple:
    """This rank's items of n (i % world_size == rank) and the placeholders that give every rank
    ceil(n / world_size) of them."""
    mine = list(range(rank, n, world_size))
    return mine, math.ceil(n / world_size) - len(mine)


@torch.no_grad()
def evaluate_batches(model, batches, num_tasks: int, device, autocast=contextlib.nullcontext, *, pad_id: int = 0,
                     rank: int = 0, world_size: int = 1) -> EvalResult:
    """Loss sums, token counts and correct counts per task over the given (host) batches; with several
    ranks each evaluates its share and all get the sums. `model`: a bare HF model, or a LossModel
    (possibly inside DDP, FSDP2 or DeepSpeed)."""
    module = as_loss_model(model, num_tasks)
    if world_size > 1:
        batches = list(batches)
        mine, placeholders = shard(len(batches), rank, world_size)
        batches = [batches[i] for i in mine] + [empty_batch(pad_id)] * placeholders
    was_training = module.training
    module.eval()
    out = EvalResult(*(torch.zeros(num_tasks, device=device) for _ in range(3)))
    for batch in batches:
        b = batch.to(device)
        with autocast():
            r = module(b, reduction="sum", with_accuracy=True)
        out.task_correct += r.task_correct
        out.task_loss_sum += r.task_loss_sum
        out.task_token_count += r.task_token_count
    module.train(was_training)
    return out.summed_over_ranks() if world_size > 1 else out


def batched(samples, batch_size: int, pad_id: int, rank: int = 0, world_size: int = 1):
    """The batches of `samples` in order; with several ranks, this rank's share, then its placeholders."""
    starts = range(0, len(samples), batch_size)
    mine, placeholders = shard(len(starts), rank, world_size)
    for i in mine:
        yield collate_padded(samples[starts[i]:starts[i] + batch_size], pad_id)
    for _ in range(placeholders):
        yield empty_batch(pad_id)


def evaluate(model, samples, *, batch_size: int, pad_id: int, num_tasks: int, device, autocast=contextlib.nullcontext,
             rank: int = 0, world_size: int = 1, progress: bool = False):
    """The whole validation set, in order (sharded over the ranks). progress: a bar on rank 0, one line
    below the train bar (position=1), removed when done (leave=False); updated on every batch, each
    being seconds of work on a real model."""
    batches = batched(samples, batch_size, pad_id, rank, world_size)
    if progress and rank == 0:
        total = math.ceil(math.ceil(len(samples) / batch_size) / world_size)
        batches = tqdm(batches, total=total, desc="eval", unit="batch", leave=False, position=1,
                       dynamic_ncols=True, mininterval=0, miniters=1)
    result = evaluate_batches(model, batches, num_tasks, device, autocast, pad_id=pad_id)
    return result.summed_over_ranks() if world_size > 1 else result


def interleave_tasks(samples) -> list:
    """Round-robin over tasks (first sample of each task, then the second, ...), so that every batch of
    at least K samples measures every task that still has samples."""
    by_task = {}
    for s in samples:
        by_task.setdefault(s.task_id, []).append(s)
    queues = [by_task[t] for t in sorted(by_task)]
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


class ValidationSampler:
    """Cycles through the validation samples, tasks interleaved, `batch_size` at a time, for the dynamic
    weighting modes; its position is part of the checkpoint."""

    def __init__(self, samples, batch_size: int, pad_id: int):
        self.samples, self.batch_size, self.pad_id = interleave_tasks(samples), batch_size, pad_id
        self.position = 0

    def next_batches(self, n: int) -> list:
        out = []
        for _ in range(n):
            if self.position >= len(self.samples):
                self.position = 0
            chunk = self.samples[self.position:self.position + self.batch_size]
            self.position += len(chunk)
            out.append(collate_padded(chunk, self.pad_id))
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
