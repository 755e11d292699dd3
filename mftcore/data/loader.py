"""StepLoader: the batches of each optimizer step, in an order that a checkpoint can resume exactly.

Each epoch is a fresh seeded permutation of the training samples (the same on every rank). With
padding, it is cut into global micro-batches of samples; with packing, the permuted samples are
first packed into rows of seq_length by best-fit-decreasing (C++), the rows are shuffled, and the
rows are cut into global micro-batches. Either way each rank takes its slice of every global
micro-batch, so every sample is used exactly once per epoch across ranks, and a sample keeps its
own task id wherever it lands; a rank whose slice of the last one is empty gets a placeholder batch
without loss tokens, so that all ranks run the same micro-batches in every step. A step is
`gradient_accumulation_steps` micro-batches and never spans two epochs. With per-task sampling
(`mixture`, mftcore/data/sampling.py) an epoch's order is its seeded draws instead of a permutation, a
function of (seed, epoch) too; packed, the number of rows (so of steps) then varies from epoch to epoch,
which `steps_per_epoch(epoch)` counts. The position (epoch, step within the epoch) is the whole state:
`state_dict()` / `load_state_dict()` continue from exactly the next step.

`Prefetcher` runs `StepLoader.steps()` one step ahead in a background thread, so that collating the
next step's batches (and pinning them, on a GPU) overlaps the current step; each Step carries the
loader position after it, which is what a checkpoint saved after that step resumes from.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass

import numpy as np

from mftcore.data.batch import collate_packed, collate_padded, empty_batch
from mftcore.data.dataset import epoch_order, micro_batches, sample_lengths
from mftcore.data.packing import best_fit_decreasing, rows_from_bins


def pack_epoch(lengths: np.ndarray, order: np.ndarray, seq_length: int, seed: int, epoch: int,
               world_size: int = 1) -> list:
    """Rows of sample indices for one epoch: BFD over the epoch's order, then the rows shuffled.

    BFD places long documents first, so its bins come out ordered by what they hold; the shuffle
    mixes them. Ties between equal lengths follow the epoch order, so rows differ between epochs,
    while their number (a function of the multiset of lengths only) does not.
    """
    if len(order) == 0:
        return []
    rows = [order[r] for r in rows_from_bins(best_fit_decreasing(lengths[order], seq_length))]
    rows = split_rows_to_multiple(rows, world_size)
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(rows))
    return [rows[r] for r in shuffle]


def split_rows_to_multiple(rows: list, world_size: int) -> list:
    """Split the rows holding the most documents in two until their number is a multiple of
    world_size: then the last global micro-batch gives every rank at least one row, and every rank
    takes the same number of steps per epoch (a rank with an empty slice would stall the others).
    Only when too few rows hold two documents (fewer samples than ranks) does a rank come up short."""
    need = -len(rows) % world_size
    if not need:
        return rows
    splittable = sorted((k for k, r in enumerate(rows) if len(r) >= 2), key=lambda k: (-len(rows[k]), k))[:need]
    halves = {k: (rows[k][:len(rows[k]) // 2], rows[k][len(rows[k]) // 2:]) for k in splittable}
    out = []
    for k, row in enumerate(rows):
        out.extend(halves.get(k, (row,)))
    return out


@dataclass
class Step:
    epoch: int
    batches: list  # the micro-batches of one optimizer step
    tokens: int  # real (non-padding) tokens of this rank's micro-batches
    sq_lengths: int  # sum of squared document lengths (the attention FLOPs)
    position: dict  # StepLoader.state_dict() after this step


class StepLoader:
    def __init__(self, samples, *, batch_size: int, accumulation: int, pad_id: int, seed: int,
                 rank: int = 0, world_size: int = 1, pack: bool = False, seq_length: int | None = None,
                 mixture=None):
        self.samples, self.batch_size, self.accumulation = samples, batch_size, accumulation
        self.pad_id, self.seed, self.rank, self.world_size = pad_id, seed, rank, world_size
        self.pack, self.seq_length = pack, seq_length
        self.mixture = mixture  # mftcore/data/sampling.py: per-task draws of each epoch; None: each sample once
        self.rows_per_epoch = {}
        self.epoch, self.step_in_epoch = 0, 0
        if pack:
            if not seq_length:
                raise ValueError("packing needs seq_length")
            self.lengths = sample_lengths(samples)
            if len(self.lengths) and self.lengths.max() > seq_length:
                raise ValueError(f"a sample of {self.lengths.max()} tokens does not fit seq_length={seq_length}")
            self.num_rows = len(pack_epoch(self.lengths, np.arange(len(self.lengths)), seq_length, seed, 0,
                                           world_size))

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Steps of `epoch`: the same for every epoch, except packed rows of a mixture's varying draws."""
        units = self.num_rows if self.pack else len(self.samples)
        if self.mixture is not None:
            units = self.mixture_rows(epoch) if self.pack else len(self.mixture)
        groups = math.ceil(units / (self.batch_size * self.world_size))
        return math.ceil(groups / self.accumulation)

    def mixture_rows(self, epoch: int) -> int:
        if epoch not in self.rows_per_epoch:
            self.rows_per_epoch[epoch] = len(pack_epoch(self.lengths, self.mixture.epoch(epoch), self.seq_length,
                                                        self.seed, epoch, self.world_size))
        return self.rows_per_epoch[epoch]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self.mixture is not None:
            return self.mixture.epoch(epoch)
        return epoch_order(len(self.samples), self.seed, epoch)

    def _epoch_groups(self, epoch: int) -> list:
        """This rank's micro-batches of the epoch, each a list of rows (pack) or of sample indices."""
        order = self._epoch_order(epoch)
        if not self.pack:
            return micro_batches(order, self.batch_size, self.rank, self.world_size)
        rows = pack_epoch(self.lengths, order, self.seq_length, self.seed, epoch, self.world_size)
        groups = micro_batches(np.arange(len(rows)), self.batch_size, self.rank, self.world_size)
        return [[rows[r] for r in g] for g in groups]

    def _collate(self, group) -> object:
        if not len(group):  # this rank's slice of the epoch's last global micro-batch is empty
            return empty_batch(self.pad_id)
        if self.pack:
            return collate_packed([[self.samples[int(j)] for j in row] for row in group], self.pad_id)
        return collate_padded([self.samples[j] for j in group], self.pad_id)

    def __iter__(self):
        """Yield (epoch, [Batch, ...]) forever, starting at the current position."""
        while True:
            groups = self._epoch_groups(self.epoch)
            starts = range(self.step_in_epoch * self.accumulation, len(groups), self.accumulation)
            for start in starts:
                chunk = groups[start:start + self.accumulation]
                self.step_in_epoch += 1
                yield self.epoch, [self._collate(g) for g in chunk]
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def steps(self):
        """Step after Step forever from the current position, with their host-side token counts."""
        for epoch, batches in self:
            yield Step(epoch, batches, sum(b.num_tokens for b in batches),
                       sum(b.sum_squared_doc_lengths() for b in batches), self.state_dict())

    def state_dict(self) -> dict:
        """The position after the last step handed out."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])


class Prefetcher:
    """`next()` returns the next Step with its batches on `device`; the Step after it is being collated
    meanwhile in a daemon thread (one step ahead: the queue holds one). On a GPU the batches are pinned
    in the thread and copied with non_blocking=True, so the copy never waits for the GPU to drain."""

    def __init__(self, steps, device):
        self.device = device
        self.pin = device.type == "cuda"
        self.queue = queue.Queue(maxsize=1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.produce, args=(iter(steps),), daemon=True, name="prefetch")
        self.thread.start()

    def produce(self, steps) -> None:
        try:
            for step in steps:
                if self.pin:
                    step.batches = [b.pin_memory() for b in step.batches]
                while not self.stopped.is_set():
                    try:
                        self.queue.put(step, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stopped.is_set():
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self.queue.put(e)

    def __iter__(self):
        return self

    def __next__(self) -> Step:
        step = self.queue.get()
        if isinstance(step, BaseException):
            raise step
        step.batches = [b.to(self.device) for b in step.batches]
        return step

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
