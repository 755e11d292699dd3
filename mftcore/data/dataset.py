"""Task directories -> tokenized samples, split into train/valid, and the per-epoch batch order.

One task per `data_paths` entry; every `*.jsonl` below it (sorted, recursive). A bad line is a
DataError naming file:line; a sample longer than seq_length is truncated and counted per task.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from mftcore.data.render import RenderError, render_record, tokenize_segments
from mftcore.errors import DataError


@dataclass
class Sample:
    input_ids: list
    loss_mask: list
    task_id: int


@dataclass
class TaskData:
    names: list
    train: list
    valid: list
    report: dict = field(default_factory=dict)  # task -> {"samples", "train", "valid", "truncated"}


def task_names(paths: list) -> list:
    """Directory basenames; a basename used twice gets its position appended ("code", "code_2")."""
    names = []
    for p in paths:
        base = os.path.basename(os.path.normpath(p)) or "task"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def jsonl_files(path: str) -> list:
    if not os.path.exists(path):
        raise DataError(f"{path}: data path does not exist")
    if os.path.isfile(path):
        return [path]
    files = sorted(glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True))
    if not files:
        raise DataError(f"{path}: no *.jsonl files in this task directory")
    return files


def read_task(path: str, task_id: int, tokenizer, eos_id: int, markers: dict, seq_length: int):
    """All samples of one task directory, plus how many were truncated to seq_length."""
    samples, truncated = [], 0
    for file in jsonl_files(path):
        with open(file, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{file}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
                try:
                    segments = render_record(record, markers)
                except RenderError as e:
                    raise DataError(f"{file}:{lineno}: {e}") from None
                ids, mask = tokenize_segments(segments, tokenizer, eos_id)
                if len(ids) > seq_length:
                    ids, mask, truncated = ids[:seq_length], mask[:seq_length], truncated + 1
                samples.append(Sample(ids, mask, task_id))
    if not samples:
        raise DataError(f"{path}: the task has no samples")
    return samples, truncated


def split_counts(n: int, train_frac: float, valid_frac: float) -> tuple:
    """MFTCoder's ceil for the train share (of the sum, not of 100); valid takes what the fraction asks."""
    n_train = min(n, math.ceil(train_frac * n))
    n_valid = min(n - n_train, math.ceil(valid_frac * n))
    return n_train, n_valid


def load_tasks(cfg, tokenizer, eos_id: int) -> TaskData:
    names = task_names(cfg.data_paths)
    train_frac, valid_frac, _ = cfg.split_fractions()
    data = TaskData(names, [], [])
    for task_id, (path, name) in enumerate(zip(cfg.data_paths, names)):
        samples, truncated = read_task(path, task_id, tokenizer, eos_id, cfg.role_markers, cfg.seq_length)
        if cfg.shuffle_before_split:
            order = np.random.default_rng([cfg.seed, task_id]).permutation(len(samples))
            samples = [samples[i] for i in order]
        n_train, n_valid = split_counts(len(samples), train_frac, valid_frac)
        data.train += samples[:n_train]
        data.valid += samples[n_train:n_train + n_valid]
        data.report[name] = {"samples": len(samples), "train": n_train, "valid": n_valid, "truncated": truncated}
    return data


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A fresh permutation of the training samples for each epoch, the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batches(order: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1) -> list:
    """Split one epoch into global micro-batches of batch_size*world_size; this rank's slice of each.

    The last global batch may be short; a rank whose slice comes up empty gets no batch there, so
    callers under data parallelism must cope (the distributed issue handles it).
    """
    per_step = batch_size * world_size
    out = []
    for start in range(0, len(order), per_step):
        chunk = order[start:start + per_step]
        mine = chunk[rank::world_size]
        if len(mine):
            out.append(mine.tolist())
    return out
