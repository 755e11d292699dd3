"""Per-task sampling: how often each task's samples are drawn, separate from how the loss weighs them.

p_t = w_t * n_t^(1/T) / sum_s w_s * n_s^(1/T), with w = `data_weights` (default 1 each) and
T = `sampling_temperature` (default: the sizes do not count, so data_weights alone are the proportions);
n_t is task t's number of training samples. Neither set: no mixture, every sample once per epoch in a
fresh permutation (the loader's plain epoch, unchanged).

An epoch is as many draws as there are training samples, N = sum n_t; task t gets m_t of them (N * p_t,
rounded by largest remainder, so they add up to N). Each task's draws come from its own endless stream
of seeded permutations of its samples: epoch e takes positions [e*m_t, (e+1)*m_t) of it, so a task drawn
less than its size still reaches all its samples over the epochs, and one drawn more repeats each sample
as evenly as possible. The epoch's draws are then shuffled together. Everything is a function of
(seed, epoch) only: the loader's position (epoch, step in epoch) stays its whole state, and a resumed run
draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import numpy as np


def task_probabilities(counts, data_weights=None, temperature=None):
    """p_t as above, or None for the natural epoch. Tasks without training samples get 0."""
    if data_weights is None and temperature is None:
        return None
    counts = np.asarray(counts, dtype=np.float64)
    w = np.ones(len(counts)) if data_weights is None else np.asarray(data_weights, dtype=np.float64)
    p = w * (counts ** (1.0 / temperature) if temperature is not None else 1.0) * (counts > 0)
    if not p.sum() > 0:
        raise ValueError("data_weights: every task with training samples has weight 0")
    return p / p.sum()


def draws_per_task(total: int, p: np.ndarray) -> np.ndarray:
    """m_t = total * p_t rounded by largest remainder (ties: the lower task index), summing to total."""
    exact = total * np.asarray(p, dtype=np.float64)
    m = np.floor(exact).astype(np.int64)
    rest = total - int(m.sum())
    if rest > 0:
        m[np.argsort(-(exact - m), kind="stable")[:rest]] += 1
    return m


class Mixture:
    """The draws of each epoch: positions into the training samples (a task's sample may repeat)."""

    def __init__(self, task_ids, p: np.ndarray, seed: int):
        task_ids = np.asarray(task_ids, dtype=np.int64)
        self.p, self.seed = np.asarray(p, dtype=np.float64), seed
        self.by_task = [np.flatnonzero(task_ids == t) for t in range(len(self.p))]
        self.draws = draws_per_task(len(task_ids), self.p)

    def __len__(self) -> int:
        return int(self.draws.sum())

    def stream(self, task: int, start: int, count: int) -> np.ndarray:
        """Positions [start, start+count) of task's stream of permutations of its samples."""
        idx = self.by_task[task]
        n = len(idx)
        out = [idx[np.random.default_rng([self.seed, task, c, 3]).permutation(n)]
               for c in range(start // n, (start + count - 1) // n + 1)]
        flat = np.concatenate(out)
        offset = start - (start // n) * n
        return flat[offset:offset + count]

    def epoch(self, epoch: int) -> np.ndarray:
        parts = [self.stream(t, epoch * int(m), int(m)) for t, m in enumerate(self.draws) if m > 0]
        order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return order[np.random.default_rng([self.seed, epoch, 2]).permutation(len(order))]


def sample_task_ids(samples) -> np.ndarray:
    """The task of each sample of a SampleView (read from the cache index) or a list of Samples."""
    store = getattr(samples, "store", None)
    if store is not None:
        return np.asarray(store.task_ids[samples.indices], dtype=np.int64)
    return np.asarray([s.task_id for s in samples], dtype=np.int64)


def build_mixture(cfg, train, num_tasks: int):
    """The Mixture of this config over the training samples, or None (natural epochs)."""
    task_ids = sample_task_ids(train)
    p = task_probabilities(np.bincount(task_ids, minlength=num_tasks), getattr(cfg, "data_weights", None),
                           getattr(cfg, "sampling_temperature", None))
    return None if p is None else Mixture(task_ids, p, cfg.seed)


def mixture_lines(cfg, train, names: list) -> list:
    """Start-up report: per task, training samples available, drawn per epoch, and the token share."""
    task_ids = sample_task_ids(train)
    lengths = getattr(train, "lengths", None)
    lengths = np.asarray(lengths if lengths is not None else [len(s.input_ids) for s in train], dtype=np.float64)
    counts = np.bincount(task_ids, minlength=len(names))
    p = task_probabilities(counts, getattr(cfg, "data_weights", None), getattr(cfg, "sampling_temperature", None))
    drawn = counts if p is None else draws_per_task(len(task_ids), p)
    mean = np.array([lengths[task_ids == t].mean() if counts[t] else 0.0 for t in range(len(names))])
    tokens = drawn * mean
    share = tokens / tokens.sum() if tokens.sum() > 0 else tokens
    how = "every sample once per epoch" if p is None else "per-task sampling (data_weights, sampling_temperature)"
    lines = [f"sampling: {how}; an epoch is {int(drawn.sum())} samples"]
    for t, name in enumerate(names):
        rate = f" ({drawn[t] / counts[t]:.2f}x)" if counts[t] else ""
        lines.append(f"sampling: task {name}: {counts[t]} train samples available, {drawn[t]} drawn per epoch{rate}, "
                     f"{100 * share[t]:.1f}% of the tokens")
    return lines
