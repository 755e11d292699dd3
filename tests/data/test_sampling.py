"""Per-task sampling: data_weights as proportions, sampling_temperature, epochs of N draws that are a
function of (seed, epoch), resumable mid-epoch bitwise; the start-up report of draws and token shares."""

import numpy as np
import pytest
import torch

from mftcore.data import Sample, StepLoader
from mftcore.data.sampling import Mixture, draws_per_task, mixture_lines, task_probabilities
from mftcore.train import train
from tests.helpers.engine import assert_bitwise_equal, engine_config, read_metrics, tensors


def test_probabilities():
    counts = [100, 300, 600]
    assert task_probabilities(counts) is None  # natural epochs
    np.testing.assert_allclose(task_probabilities(counts, [1, 1, 2]), [0.25, 0.25, 0.5])  # proportions
    np.testing.assert_allclose(task_probabilities(counts, temperature=1), [0.1, 0.3, 0.6])
    p = np.sqrt(counts) / np.sqrt(counts).sum()
    np.testing.assert_allclose(task_probabilities(counts, temperature=2), p)
    weighted = p * [2, 1, 1]
    np.testing.assert_allclose(task_probabilities(counts, [2, 1, 1], temperature=2), weighted / weighted.sum())
    np.testing.assert_allclose(task_probabilities([0, 10], [1, 1]), [0, 1])  # no samples, no draws
    assert draws_per_task(10, [0.25, 0.25, 0.5]).tolist() == [3, 2, 5]  # 2.5, 2.5: the first remainder wins
    assert draws_per_task(7, [1 / 3] * 3).sum() == 7


def make_samples(sizes):
    """Samples whose first token is their index, of varied lengths, task t for the t-th block."""
    out, rng = [], np.random.default_rng(0)
    for t, n in enumerate(sizes):
        for _ in range(n):
            length = int(rng.integers(2, 30))
            out.append(Sample([1000 + len(out)] + [7] * (length - 1), [0] + [1] * (length - 1), t))
    return out


def test_epoch_draws_counts_coverage_and_repeats():
    task_ids = np.repeat([0, 1, 2], [10, 30, 60])
    mix = Mixture(task_ids, task_probabilities([10, 30, 60], [1, 1, 1]), seed=5)
    assert len(mix) == 100 and mix.draws.tolist() == [34, 33, 33]
    e0, e1 = mix.epoch(0), mix.epoch(1)
    assert np.array_equal(e0, Mixture(task_ids, mix.p, 5).epoch(0)) and not np.array_equal(e0, e1)
    assert not np.array_equal(e0, Mixture(task_ids, mix.p, 6).epoch(0))
    assert np.bincount(task_ids[e0]).tolist() == [34, 33, 33]
    # task 0 (10 samples, 34 draws): each sample 3 or 4 times; task 2 (60, 33 draws): none twice, and over
    # two epochs 66 draws reach every one of its samples
    assert set(np.bincount(e0[task_ids[e0] == 0], minlength=10).tolist()) <= {3, 4}
    assert np.bincount(e0[task_ids[e0] == 2]).max() == 1
    both = np.concatenate([e0, e1])
    assert set(both[task_ids[both] == 2].tolist()) == set(range(40, 100))


@pytest.mark.parametrize("pack", [False, True])
def test_loader_with_a_mixture_resumes_mid_epoch_bitwise(pack):
    samples = make_samples([20, 60, 120])
    task_ids = np.array([s.task_id for s in samples])

    def make():
        mix = Mixture(task_ids, task_probabilities([20, 60, 120], [2, 1, 1], temperature=2.0), seed=3)
        return StepLoader(samples, batch_size=4, accumulation=2, pad_id=0, seed=3, pack=pack, seq_length=64,
                          mixture=mix)

    full = make()
    counts = [full.steps_per_epoch(e) for e in range(3)]
    it = iter(full)
    steps = [next(it) for _ in range(sum(counts))]
    assert [sum(1 for e, _ in steps if e == k) for k in range(3)] == counts  # steps_per_epoch(epoch) is exact
    cut = counts[0] + counts[1] // 2  # in the middle of epoch 1
    resumed = make()
    resumed.load_state_dict({"epoch": 1, "step_in_epoch": counts[1] // 2})
    it2 = iter(resumed)
    for epoch, batches in steps[cut:]:
        e2, batches2 = next(it2)
        assert e2 == epoch and len(batches2) == len(batches)
        for a, b in zip(batches, batches2):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.task_ids, b.task_ids)
    # the drawn share follows p: task 0 (20 samples, weight 2) gets the most draws per sample
    drawn = np.concatenate([full.mixture.epoch(0)])
    per_sample = np.bincount(task_ids[drawn], minlength=3) / [20, 60, 120]
    assert per_sample[0] > per_sample[1] > per_sample[2]


def test_report_lines_show_available_drawn_and_token_share():
    samples = make_samples([10, 30])

    class Cfg:
        data_weights, sampling_temperature, seed = [1, 1], None, 0

    lines = mixture_lines(Cfg, samples, ["a", "b"])
    assert lines[0] == "sampling: per-task sampling (data_weights, sampling_temperature); an epoch is 40 samples"
    assert lines[1].startswith("sampling: task a: 10 train samples available, 20 drawn per epoch (2.00x), ")
    assert lines[2].startswith("sampling: task b: 30 train samples available, 20 drawn per epoch (0.67x), ")
    shares = [float(line.rsplit(", ", 1)[1].split("%")[0]) for line in lines[1:]]
    assert abs(sum(shares) - 100) < 0.2
    Cfg.data_weights = None
    assert mixture_lines(Cfg, samples, ["a", "b"])[1].startswith(
        "sampling: task a: 10 train samples available, 10 drawn per epoch (1.00x)")


def test_training_with_a_mixture_resumes_mid_epoch_bitwise(tmp_path):
    """Packed rows of a weighted, tempered mixture, resumed mid-epoch: the same draws, bitwise equal weights
    (the loader test above resumes across epochs)."""
    run = dict(padding_mode="pack", per_device_train_batch_size=4, max_train_steps=8, checkpointing_steps=4,
               data_weights=[3, 1, 1], sampling_temperature=2.0)
    first = train(engine_config(tmp_path / "a", **run))
    second = train(engine_config(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"), **run))
    assert_bitwise_equal(tensors(second), tensors(first))
    resumed = [(r["step"], r["loss"], r["task_tokens"]) for r in read_metrics(tmp_path / "b", "train")]
    assert resumed == [(r["step"], r["loss"], r["task_tokens"]) for r in read_metrics(tmp_path / "a", "train")][4:]
    natural = train(engine_config(tmp_path / "c", **{**run, "data_weights": None, "sampling_temperature": None}))
    assert not torch.equal(tensors(natural)["lm_head.weight"], tensors(first)["lm_head.weight"])
