"""Every phase longer than a few seconds shows progress: a bar per evaluation pass (during training,
CoBa's initial pass) and per benchmark evaluation, on stderr below the train bar. Counted by the bar's
updates ("eval: ... k/N"), never by time."""

import os
import re

from mftcore.config import TrainConfig
from mftcore.train import train
from tests.helpers.engine import engine_config
from tests.helpers.paths import ROOT

HE = os.path.join(ROOT, "examples", "benchmarks", "humaneval_tiny.jsonl")


def bar_counts(err: str, desc: str) -> list:
    """[(k, N)] of every update the bar `desc` printed."""
    return [(int(k), int(n)) for k, n in re.findall(rf"{desc}:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", err)]


def test_each_evaluation_pass_shows_a_bar_updated_per_batch(tiny_config, capfd):
    # 24 validation samples, 8 per batch: 3 batches; evaluations at steps 2 and 4
    path, _ = tiny_config(max_train_steps=4, evaluation_steps=2, per_device_eval_batch_size=8)
    train(TrainConfig.from_file(path))
    counts = bar_counts(capfd.readouterr().err, "eval")
    assert counts.count((3, 3)) == 2, counts  # two passes, each to its end
    assert {k for k, _ in counts} == {0, 1, 2, 3} and {n for _, n in counts} == {3}


def test_cobas_initial_validation_pass_shows_a_bar(tiny_config, capfd):
    path, _ = tiny_config(max_train_steps=1, weighted_loss_mode="coba", per_device_eval_batch_size=8)
    train(TrainConfig.from_file(path))
    assert (3, 3) in bar_counts(capfd.readouterr().err, "eval")


def test_benchmark_evaluation_shows_a_bar_per_completion(tmp_path, capfd):
    bench = [{"name": "he", "file": HE, "every_steps": 1, "max_new_tokens": 4, "limit": 3, "batch_size": 1}]
    train(engine_config(tmp_path / "b", eval_benchmarks=bench, max_train_steps=1, per_device_train_batch_size=4))
    counts = bar_counts(capfd.readouterr().err, "he")
    assert (3, 3) in counts and (1, 3) in counts, counts
