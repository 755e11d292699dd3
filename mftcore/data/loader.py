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
which `steps_per_epoch(epoch)` counts. The position (epoch, units of the epoch consumed: samples or
draws, or packed rows) is the whole state: `state_dict()` / `load_state_dict()` continue from exactly
the next unit. Resumed with another batch size, accumulation or number of ranks, the epoch continues
from that unit in the new step size: no sample is skipped or repeated. Where no exact continuation
exists (mid-epoch, with packing on another number of ranks, whose rows differ, or with other data),
load_state_dict refuses in one line.

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
from mftcore.errors import ConfigError, DataError


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
        self.epoch, self.step_in_epoch, self.consumed = 0, 0, 0
        if not len(samples):  # an epoch without a step would loop forever looking for the next one
            raise DataError("data_split: no training samples: every task's samples went to validation or test")
        if pack:
            if not seq_length:
                raise ValueError("packing needs seq_length")
            self.lengths = sample_lengths(samples)
            if len(self.lengths) and self.lengths.max() > seq_length:
                raise ValueError(f"a sample of {self.lengths.max()} tokens does not fit seq_length={seq_length}")
            self.num_rows = len(pack_epoch(self.lengths, np.arange(len(self.lengths)), seq_length, seed, 0,
                                           world_size))

    def epoch_units(self, epoch: int) -> int:
        """Samples or draws (padding) or packed rows (pack) in `epoch`: the same for every epoch, except
        packed rows of a mixture's varying draws."""
        if self.mixture is not None:
            return self.mixture_rows(epoch) if self.pack else len(self.mixture)
        return self.num_rows if self.pack else len(self.samples)

    @property
    def units(self) -> int:
        """Units of the current epoch."""
        return self.epoch_units(self.epoch)

    @property
    def units_per_step(self) -> int:
        return self.batch_size * self.world_size * self.accumulation

    def steps_per_epoch(self, epoch: int = 0) -> int:
        return self.steps_left(0, epoch)

    def steps_left(self, consumed: int, epoch: int | None = None) -> int:
        """Steps from `consumed` units to the end of `epoch` (default: the current one)."""
        units = self.units if epoch is None else self.epoch_units(epoch)
        groups = math.ceil(max(units - consumed, 0) / (self.batch_size * self.world_size))
        return math.ceil(groups / self.accumulation)

    def remaining_steps(self, epochs: int) -> int:
        """Steps from the current position to the end of epoch `epochs` - 1."""
        if self.epoch >= epochs:
            return 0
        return self.steps_left(self.consumed) + sum(self.steps_per_epoch(e) for e in range(self.epoch + 1, epochs))

    def epoch_ended(self, position: dict) -> bool:
        return position.get("consumed", 0) >= self.epoch_units(position.get("epoch", self.epoch))

    def mixture_rows(self, epoch: int) -> int:
        if epoch not in self.rows_per_epoch:
            self.rows_per_epoch[epoch] = len(pack_epoch(self.lengths, self.mixture.epoch(epoch), self.seq_length,
                                                        self.seed, epoch, self.world_size))
        return self.rows_per_epoch[epoch]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self.mixture is not None:
            return self.mixture.epoch(epoch)
        return epoch_order(len(self.samples), self.seed, epoch)

    def _epoch_units(self, epoch: int) -> list:
        """The epoch's order of sample indices (padding) or its packed rows (pack)."""
        order = self._epoch_order(epoch)
        if not self.pack:
            return order
        return pack_epoch(self.lengths, order, self.seq_length, self.seed, epoch, self.world_size)

    def _step_groups(self, units, start: int) -> list:
        """This rank's micro-batches of the step that starts at unit `start`: the step's units cut into
        global micro-batches of batch_size x world_size, the same cuts as over the whole epoch when
        `start` is a multiple of that (always, unless a resume changed the step size)."""
        span = units[start:start + self.units_per_step]
        if not self.pack:
            return micro_batches(np.asarray(span), self.batch_size, self.rank, self.world_size)
        groups = micro_batches(np.arange(len(span)), self.batch_size, self.rank, self.world_size)
        return [[span[r] for r in g] for g in groups]

    def _collate(self, group) -> object:
        if not len(group):  # this rank's slice of the epoch's last global micro-batch is empty
            return empty_batch(self.pad_id)
        if self.pack:
            return collate_packed([[self.samples[int(j)] for j in row] for row in group], self.pad_id)
        return collate_padded([self.samples[j] for j in group], self.pad_id)

    def __iter__(self):
        """Yield (epoch, [Batch, ...]) forever, starting at the current position."""
        while True:
            units = self._epoch_units(self.epoch)
            while self.consumed < len(units):
                groups = self._step_groups(units, self.consumed)
                self.consumed = min(self.consumed + self.units_per_step, len(units))
                self.step_in_epoch += 1
                yield self.epoch, [self._collate(g) for g in groups]
            self.epoch, self.step_in_epoch, self.consumed = self.epoch + 1, 0, 0

    def steps(self):
        """Step after Step forever from the current position, with their host-side token counts."""
        for epoch, batches in self:
            yield Step(epoch, batches, sum(b.num_tokens for b in batches),
                       sum(b.sum_squared_doc_lengths() for b in batches), self.state_dict())

    def state_dict(self) -> dict:
        """The position after the last step handed out, and what it counts in (to check a resume)."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "consumed": self.consumed,
                "units": self.units, "units_per_step": self.units_per_step, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue after `state`; a checkpoint from before "consumed" was saved counts in this run's step size."""
        epoch, step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        units = self.epoch_units(epoch)
        consumed = int(state.get("consumed", min(step_in_epoch * self.units_per_step, units)))
        mid_epoch = 0 < consumed < int(state.get("units", units))
        if mid_epoch and self.pack and state.get("world_size", self.world_size) != self.world_size:
            raise ConfigError(f"resume_from_checkpoint: the checkpoint stopped mid-epoch with packed rows split for "
                              f"{state['world_size']} ranks; this run's {self.world_size} would pack the epoch "
                              f"into other rows: resume on {state['world_size']} ranks, or from a checkpoint at "
                              "the end of an epoch")
        if mid_epoch and state.get("units", units) != units:
            what = "packed rows" if self.pack else "training samples"
            raise ConfigError(f"resume_from_checkpoint: the checkpoint stopped mid-epoch after {consumed} of its "
                              f"{state['units']} {what}, this run has {units} (other data, data_split, "
                              f"seq_length or packing): no exact continuation; resume with the same data, or from "
                              f"a checkpoint at the end of an epoch")
        self.epoch, self.step_in_epoch, self.consumed = epoch, step_in_epoch, consumed


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
