"""The start-up report's plan of the run: rows per epoch (and how full packed rows are), steps per
epoch and how many epochs the run's steps make, and where the validation data comes from. Everything
is read from the StepLoader that will feed the run (epoch 0's order), so the report is what happens.
"""

from __future__ import annotations

import numpy as np

from mftcore.data.dataset import sample_lengths


def epoch_tokens(loader, epoch: int = 0) -> int:
    """Tokens of the samples an epoch uses (a mixture draws some samples more than once)."""
    lengths = loader.lengths if loader.pack else sample_lengths(loader.samples)
    if loader.mixture is not None:
        return int(lengths[np.asarray(loader.mixture.epoch(epoch), dtype=np.int64)].sum())
    return int(lengths.sum())


def plan_lines(cfg, loader, total_steps: int, n_valid: int) -> list:
    """Rows, fill, steps per epoch, epochs of the run, tokens per step, validation data, where outputs go: lines
    of the start-up report."""
    rows = loader.epoch_units(0)
    if loader.pack:
        fill = epoch_tokens(loader) / (rows * cfg.seq_length) if rows else 0.0
        layout = (f"data: {rows} packed rows of seq_length={cfg.seq_length} per epoch, {100 * fill:.1f}% full "
                  f"(the rest padding)")
    else:
        layout = f"data: {rows} rows per epoch, one sample per row, padded to each micro-batch's longest"
    per_step = loader.units_per_step
    steps = loader.steps_per_epoch(0)
    epochs = total_steps / steps if steps else 0.0
    lines = [layout,
             f"steps: {steps} per epoch ({loader.batch_size} rows x {loader.accumulation} accumulation x "
             f"{loader.world_size} ranks = {per_step} rows per step); {total_steps} steps = {epochs:.2f} epochs"
             + ("" if cfg.max_train_steps else f" (num_train_epochs={cfg.num_train_epochs})")
             + (f"; {epoch_tokens(loader) / steps:,.0f} tokens per step on average (real tokens, not padding)"
                if steps else "")]
    split = f"data_split={cfg.data_split!r} (train,valid,test shares of each task's samples"
    split += ", shuffled by seed first)" if cfg.shuffle_before_split else ", in file order)"
    if n_valid:
        lines.append(f"validation: {n_valid} samples, from {split}")
    else:
        lines.append(f"validation: none from {split}: no evaluation, no best checkpoint")
    lines.append(f"outputs: {cfg.output_dir} (checkpoint-<step>/, final/, metrics.jsonl, run.json, memory.json, "
                 f"report.html; TensorBoard in {cfg.tb_dir or 'tensorboard/'})")
    return lines
