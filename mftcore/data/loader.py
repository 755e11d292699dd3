"""StepLoader: the batches of each optimizer step, in an order that a checkpoint can resume exactly.

Each epoch is a fresh seeded permutation of the training samples (the same on every rank); it is
cut into global micro-batches and each rank takes its slice. A step is `gradient_accumulation_steps`
micro-batches and never spans two epochs. The position (epoch, step within the epoch) is the whole
state: `state_dict()` / `load_state_dict()` continue from exactly the next step.
"""

from __future__ import annotations

import math

from mftcore.data.batch import collate_padded
from mftcore.data.dataset import epoch_order, micro_batches


class StepLoader:
    def __init__(self, samples, *, batch_size: int, accumulation: int, pad_id: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.samples, self.batch_size, self.accumulation = samples, batch_size, accumulation
        self.pad_id, self.seed, self.rank, self.world_size = pad_id, seed, rank, world_size
        self.epoch, self.step_in_epoch = 0, 0

    def steps_per_epoch(self) -> int:
        groups = math.ceil(len(self.samples) / (self.batch_size * self.world_size))
        return math.ceil(groups / self.accumulation)

    def _epoch_groups(self, epoch: int) -> list:
        order = epoch_order(len(self.samples), self.seed, epoch)
        return micro_batches(order, self.batch_size, self.rank, self.world_size)

    def __iter__(self):
        """Yield (epoch, [Batch, ...]) forever, starting at the current position."""
        while True:
            groups = self._epoch_groups(self.epoch)
            starts = range(self.step_in_epoch * self.accumulation, len(groups), self.accumulation)
            for start in starts:
                chunk = groups[start:start + self.accumulation]
                self.step_in_epoch += 1
                yield self.epoch, [collate_padded([self.samples[j] for j in g], self.pad_id) for g in chunk]
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """The position after the last step handed out."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
