"""Validation: per-task loss and next-token accuracy over the validation samples, and the small cyclic
sampler that feeds the dynamic weighting modes (self-paced, CoBa) a few validation batches at a time.

Loss comes from the fused cross-entropy (never the N x V logits). Accuracy needs an argmax over the
vocabulary, so evaluation alone computes logits, for the loss tokens only and in row chunks of at most
`LOGIT_CHUNK_ELEMENTS` floats.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mftcore.data import IGNORE_INDEX, collate_padded
from mftcore.kernels import fused_linear_cross_entropy
from mftcore.model import hidden_states, lm_head

LOGIT_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of fp32 logits per chunk


@dataclass
class EvalResult:
    task_loss_sum: torch.Tensor  # [K] fp32, summed token cross-entropy
    task_count: torch.Tensor  # [K] loss tokens
    task_correct: torch.Tensor  # [K] tokens whose argmax is the label

    def task_losses(self) -> list:
        """Token-mean loss per task; None for a task with no tokens here."""
        return [float(s / c) if c > 0 else None for s, c in zip(self.task_loss_sum.tolist(), self.task_count.tolist())]

    def task_accuracy(self) -> list:
        return [float(r / c) if c > 0 else None for r, c in zip(self.task_correct.tolist(), self.task_count.tolist())]

    def accuracy(self) -> float:
        return float(self.task_correct.sum() / self.task_count.sum().clamp(min=1))

    def combined_loss(self, weights=None) -> float:
        """case3 of the validation set: weighted mean over tasks present of their token-mean loss."""
        w = torch.ones_like(self.task_count) if weights is None else torch.as_tensor(weights).to(self.task_count)
        present = torch.where(self.task_count > 0, w, 0.0)
        means = self.task_loss_sum / self.task_count.clamp(min=1)
        return float((present * means).sum() / present.sum().clamp(min=1e-12))


def count_correct(hidden: torch.Tensor, head, labels: torch.Tensor, task_ids: torch.Tensor, num_tasks: int):
    """[K] count of loss tokens whose argmax logit is the label, logits built chunk by chunk."""
    valid = labels != IGNORE_INDEX
    h, y, t = hidden[valid], labels[valid], task_ids[valid]
    correct = torch.zeros(num_tasks, device=hidden.device)
    rows = max(1, LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])
    for i in range(0, h.shape[0], rows):
        logits = torch.nn.functional.linear(h[i:i + rows], head.weight, head.bias)
        hit = (logits.argmax(-1) == y[i:i + rows]).float()
        correct.index_add_(0, t[i:i + rows], hit)
    return correct


@torch.no_grad()
def evaluate_batches(model, batches, num_tasks: int, device, autocast=contextlib.nullcontext) -> EvalResult:
    """Loss sums, token counts and correct counts per task over the given (host) batches."""
    was_training = model.training
    model.eval()
    out = EvalResult(*(torch.zeros(num_tasks, device=device) for _ in range(3)))
    head = lm_head(model)
    for batch in batches:
        b = batch.to(device)
        with autocast():
            hidden = hidden_states(model, b).flatten(0, 1)
            ce = fused_linear_cross_entropy(hidden, head.weight, b.labels.flatten(), b.task_ids.flatten(),
                                            bias=head.bias, num_tasks=num_tasks, reduction="sum")
            out.task_correct += count_correct(hidden, head, b.labels.flatten(), b.task_ids.flatten(), num_tasks)
        out.task_loss_sum += ce.task_loss_sum
        out.task_count += ce.task_token_count
    model.train(was_training)
    return out


def batched(samples, batch_size: int, pad_id: int):
    for i in range(0, len(samples), batch_size):
        yield collate_padded(samples[i:i + batch_size], pad_id)


def evaluate(model, samples, *, batch_size: int, pad_id: int, num_tasks: int, device, autocast=contextlib.nullcontext):
    """The whole validation set, in order."""
    return evaluate_batches(model, batched(samples, batch_size, pad_id), num_tasks, device, autocast)


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
