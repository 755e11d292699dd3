"""Task directories -> the cached samples, split into train/valid, and the per-epoch sample order.

One task per `data_paths` entry; every `*.jsonl` below it (sorted, recursive). Tokenizing happens
once, into the cache (mftcore.data.cache); here the cached samples are split per task: shuffled by
seed (`shuffle_before_split`), then train = ceil(train fraction * n) as in MFTCoder, valid = the
valid fraction. Samples are read from the memory map only when a batch needs them, so each rank
touches only the samples of its own batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mftcore.data.cache import SampleStore, prepare_cache
from mftcore.data.sampling import mixture_lines


@dataclass
class Sample:
    input_ids: object  # list or int array
    loss_mask: object  # aligned with input_ids, 1 = training target
    task_id: int


class SampleView:
    """A subset of a SampleStore (e.g. one split), indexable like a list of Sample."""

    def __init__(self, store: SampleStore, indices: np.ndarray):
        self.store, self.indices = store, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Sample(*self.store.sample(int(self.indices[i])))

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return self.store.lengths[self.indices]


@dataclass
class TaskData:
    names: list
    train: object  # SampleView (or a list of Sample)
    valid: object
    report: dict = field(default_factory=dict)  # task -> counts: samples, train, valid, truncated, dropped, skipped
    cache: str = ""  # the cache entry directory
    cache_reused: bool = False


def sample_lengths(samples) -> np.ndarray:
    lengths = getattr(samples, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths, dtype=np.int64)
    return np.asarray([len(s.input_ids) for s in samples], dtype=np.int64)


def split_counts(n: int, train_frac: float, valid_frac: float) -> tuple:
    """MFTCoder's ceil for the train share (of the sum, not of 100); valid takes what the fraction asks."""
    n_train = min(n, math.ceil(train_frac * n))
    n_valid = min(n - n_train, math.ceil(valid_frac * n))
    return n_train, n_valid


def load_tasks(cfg, tokenizer, eos_id: int, *, local_rank: int = 0, progress: bool = True) -> TaskData:
    """Build or reuse the cache entry for cfg (on local rank 0; the others wait for it), then split each
    task into train and valid indices."""
    path, reused = prepare_cache(cfg, tokenizer, eos_id, local_rank=local_rank, progress=progress)
    store = SampleStore(path)
    names = [t["name"] for t in store.meta["tasks"]]
    train_frac, valid_frac, _ = cfg.split_fractions()
    train, valid, report = [], [], {}
    for task_id, task in enumerate(store.meta["tasks"]):
        start, end = store.task_range(task_id)
        idx = np.arange(start, end)
        if cfg.shuffle_before_split:
            idx = idx[np.random.default_rng([cfg.seed, task_id]).permutation(len(idx))]
        n_train, n_valid = split_counts(len(idx), train_frac, valid_frac)
        train.append(idx[:n_train])
        valid.append(idx[n_train:n_train + n_valid])
        report[task["name"]] = {"samples": task["samples"], "train": n_train, "valid": n_valid,
                                "truncated": task["truncated"], "dropped": task["dropped"],
                                "skipped": task["skipped"], "skip_examples": task["skip_examples"],
                                "loss_tokens": task["loss_tokens"], "no_loss_samples": task["no_loss_samples"],
                                "max_id": task["max_id"], "max_id_at": task["max_id_at"]}
    return TaskData(names, SampleView(store, np.concatenate(train)), SampleView(store, np.concatenate(valid)),
                    report, path, reused)


def report_lines(data: TaskData, cfg) -> list:
    """The start-up report: the cache entry, then per task its counts; nothing is dropped silently."""
    lines = [f"data cache: {data.cache} ({'reused' if data.cache_reused else 'built'})"]
    verb = "dropped" if cfg.long_sample_policy == "drop" else "truncated"
    for name, r in data.report.items():
        line = (f"task {name}: {r['samples']} samples ({r['train']} train, {r['valid']} valid), "
                f"{r[verb]} longer than seq_length={cfg.seq_length} {verb}, {r['skipped']} bad lines skipped")
        if r["skip_examples"]:
            line += f" (first: {r['skip_examples'][0]})"
        if r.get("no_loss_samples"):
            line += f"; {r['no_loss_samples']} without any loss token"
        lines.append(line)
        if r.get("loss_tokens") == 0:
            lines.append(f"warning: task {name} has no loss tokens (no assistant answer within seq_length="
                         f"{cfg.seq_length}): it trains nothing")
    return lines + mixture_lines(cfg, data.train, data.names)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A fresh permutation of the training samples for each epoch, the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batches(order: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1) -> list:
    """Split one epoch into global micro-batches of batch_size*world_size; this rank's slice of each.

    The last global batch may be short: a rank whose slice comes up empty gets an empty list there,
    so every rank has as many micro-batches (StepLoader turns an empty one into a placeholder batch
    without loss tokens; a rank that skipped it would leave the others waiting in a collective).
    """
    per_step = batch_size * world_size
    return [order[start:start + per_step][rank::world_size].tolist() for start in range(0, len(order), per_step)]
