"""Logging: metrics.jsonl (one JSON object per logged step), TensorBoard, and a tqdm progress bar."""

from __future__ import annotations

import json
import os

from tqdm.auto import tqdm


class Metrics:
    """Rank 0 writes; other ranks get a silent instance. TensorBoard tags follow MFTCoder
    (`{task}_loss/train`, `{task}_loss/valid`) so existing dashboards keep working."""

    def __init__(self, output_dir: str, tb_dir: str | None, total_steps: int, initial_step: int = 0,
                 enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(output_dir, exist_ok=True)
        # A fresh run starts a fresh file; a run continuing from a checkpoint appends to it.
        mode = "a" if initial_step else "w"
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), mode, encoding="utf-8")
        self.tb = SummaryWriter(tb_dir or os.path.join(output_dir, "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def advance(self, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def write(self, step: int, split: str, scalars: dict, task_loss: dict) -> None:
        """One JSONL record {"step", "split", **scalars, "task_loss": {task: loss}} and the TB scalars."""
        if not self.enabled:
            return
        record = {"step": step, "split": split, **scalars, "task_loss": task_loss}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in scalars.items():
            self.tb.add_scalar(f"{key}/{split}", value, step)
        for task, value in task_loss.items():
            self.tb.add_scalar(f"{task}_loss/{split}", value, step)

    def print(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()
