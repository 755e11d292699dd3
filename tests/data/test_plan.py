"""The start-up report's plan (mftcore/data/plan.py) against what the loader actually yields."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from mftcore.data import Sample, StepLoader
from mftcore.data.plan import plan_lines


def make_samples(n):
    lengths = np.clip(np.random.default_rng(0).lognormal(2.0, 1.0, n).astype(int), 1, 40)
    return [Sample([7] * int(k), [1] * int(k), task_id=i % 3) for i, k in enumerate(lengths)]


def cfg(**kw):
    base = dict(output_dir="out/run", tb_dir=None, seq_length=64, max_train_steps=40, num_train_epochs=1, data_split="98,2,0", shuffle_before_split=True)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("pack", [True, False])
def test_plan_matches_one_epoch_of_the_loader(pack):
    samples = make_samples(300)
    loader = StepLoader(samples, batch_size=4, accumulation=2, pad_id=0, seed=1, pack=pack, seq_length=64)
    steps = list(itertools.islice(loader.steps(), loader.steps_per_epoch()))
    assert steps[-1].position["consumed"] == steps[-1].position["units"]  # exactly one epoch
    rows = sum(b.input_ids.shape[0] for s in steps for b in s.batches if (b.task_ids >= 0).any())
    tokens = sum(s.tokens for s in steps)
    assert tokens == sum(len(x.input_ids) for x in samples)
    layout, plan, valid, outputs = plan_lines(cfg(), StepLoader(samples, batch_size=4, accumulation=2, pad_id=0, seed=1,
                                                       pack=pack, seq_length=64), 40, 6)
    if pack:
        assert layout.startswith(f"data: {rows} packed rows of seq_length=64 per epoch, "
                                 f"{100 * tokens / (rows * 64):.1f}% full")
    else:
        assert layout.startswith(f"data: {rows} rows per epoch, one sample per row")
    assert plan.startswith(f"steps: {len(steps)} per epoch (4 rows x 2 accumulation x 1 ranks = 8 rows per step); "
                           f"40 steps = {40 / len(steps):.2f} epochs; {tokens / len(steps):,.0f} tokens per step "
                           "on average (real tokens, not padding)")
    assert outputs.startswith("outputs: out/run (checkpoint-<step>/, final/, metrics.jsonl") \
        and outputs.endswith("TensorBoard in tensorboard/)")
    assert valid == "validation: 6 samples, from data_split='98,2,0' (train,valid,test shares of each task's " \
                    "samples, shuffled by seed first)"


def test_plan_says_when_there_is_no_validation_data():
    loader = StepLoader(make_samples(50), batch_size=4, accumulation=1, pad_id=0, seed=1)
    lines = plan_lines(cfg(max_train_steps=None, num_train_epochs=3, data_split="100,0,0",
                           shuffle_before_split=False), loader, 3 * loader.steps_per_epoch(), 0)
    assert "= 3.00 epochs (num_train_epochs=3); " in lines[1]
    assert lines[2] == "validation: none from data_split='100,0,0' (train,valid,test shares of each task's " \
                       "samples, in file order): no evaluation, no best checkpoint"
