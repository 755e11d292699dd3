"""eval_benchmarks during training: the training is bitwise what it is without them (the random streams
are untouched), a resumed run evaluates exactly as the uninterrupted one, metric_for_best picks the best
checkpoint and stops early, and config mistakes are one line."""

import json
import os

import pytest

from mftcore.errors import ConfigError
from mftcore.train import train
from tests.helpers.engine import assert_bitwise_equal, engine_config, read_metrics, tensors
from tests.helpers.paths import ROOT, TINY_MODEL

HE = os.path.join(ROOT, "examples", "benchmarks", "humaneval_tiny.jsonl")
MBPP = os.path.join(ROOT, "examples", "benchmarks", "mbpp_tiny.jsonl")
# Attention dropout draws from the torch RNG every step, and sampled completions (n=2, temperature 1)
# draw from it too: a benchmark that moved the training's streams would change the weights.
BENCHMARKS = [{"name": "he", "file": HE, "every_steps": 2, "max_new_tokens": 8, "n": 2, "k": [1, 2],
               "temperature": 1.0, "workers": 2},
              {"name": "mbpp", "file": MBPP, "every_steps": 3, "max_new_tokens": 8, "prompt_format": "raw"}]
RUN = dict(model_config={**TINY_MODEL, "attention_dropout": 0.1}, max_train_steps=4, per_device_train_batch_size=4)


def benchmark_files(out, name):
    folder = os.path.join(out, "benchmarks", name)
    return {f: [json.loads(line) for line in open(os.path.join(folder, f))] for f in sorted(os.listdir(folder))}


def test_training_with_benchmarks_is_bitwise_the_training_without(tmp_path):
    plain = train(engine_config(tmp_path / "plain", **RUN))
    evaluated = train(engine_config(tmp_path / "eval", eval_benchmarks=BENCHMARKS, **RUN))
    assert_bitwise_equal(tensors(evaluated), tensors(plain))
    losses = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "eval", "train")]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "plain", "train")]
    he = read_metrics(tmp_path / "eval", "he")
    assert [r["step"] for r in he] == [2, 4] and set(he[0]) >= {"pass@1", "pass@2", "problems", "task_pass@1"}
    assert he[0]["problems"] == 4 and set(he[0]["task_pass@1"]) == {"python_funcs", "sql_queries"}
    assert [r["step"] for r in read_metrics(tmp_path / "eval", "mbpp")] == [3, 4]  # every 3, and the last step
    files = benchmark_files(tmp_path / "eval", "he")
    assert list(files) == ["step-2.jsonl", "step-4.jsonl"]
    first = files["step-2.jsonl"][0]
    assert first["task_id"] == "mft/0" and len(first["completions"]) == 2 and len(first["errors"]) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "eval" / "tensorboard"))
    events.Reload()
    assert {"pass@1/he", "pass@2/he", "python_funcs_pass@1/he", "pass@1/mbpp"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("pass@1/he")] == [2, 4]


def test_resumed_run_evaluates_as_the_uninterrupted_one(tmp_path):
    run = dict(RUN, checkpointing_steps=2, eval_benchmarks=BENCHMARKS)
    first = train(engine_config(tmp_path / "a", **run))
    second = train(engine_config(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"), **run))
    assert_bitwise_equal(tensors(second), tensors(first))
    resumed, uninterrupted = (benchmark_files(tmp_path / d, "he")["step-4.jsonl"] for d in ("b", "a"))
    assert resumed == uninterrupted
    assert read_metrics(tmp_path / "b", "mbpp") == read_metrics(tmp_path / "a", "mbpp")


def test_metric_for_best_picks_the_checkpoint_and_stops_early(tmp_path, capsys):
    """The tiny model passes nothing: pass@1 is 0.0 at step 2 (the first value, a new best) and not better
    at step 4, so with a stall of 1 the run stops there, although the validation loss still falls."""
    out = tmp_path / "out"
    train(engine_config(out, **{**RUN, "max_train_steps": 8}, data_split="90,10,0", evaluation_steps=2,
                        eval_benchmarks=BENCHMARKS[:1], metric_for_best="he/pass@1", early_stopping_stall_num=1))
    err = capsys.readouterr()
    text = err.out + err.err
    assert "early stopping at step 4: no better he/pass@1 in 1 evaluations (best 0.0000 at step 2)" in text
    assert "best he/pass@1 0.0000 at step 2" in text
    valid = read_metrics(out, "valid")
    assert [r["step"] for r in valid] == [2, 4] and valid[1]["loss"] < valid[0]["loss"]
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_step"] == 2 and state["best_metric"] == 0.0 and state["early_stopped"]
    assert [e[:2] for e in state["benchmark_evaluations"]] == [[2, "he"], [4, "he"]]


@pytest.mark.parametrize("updates, message", [
    ({"eval_benchmarks": [{"name": "he"}]}, "eval_benchmarks[0].file: required"),
    ({"eval_benchmarks": [{"name": "he", "file": HE, "k": [1, 10], "n": 5, "temperature": 0.8}]},
     "eval_benchmarks[0].k: pass@10 needs n >= 10"),
    ({"eval_benchmarks": [{"name": "he", "file": HE, "n": 4, "temperature": 0}]},
     "eval_benchmarks[0].temperature: n=4 greedy"),
    ({"eval_benchmarks": [{"name": "he", "file": HE, "prompt_format": "chat"}]}, "prompt_format: 'chat' is not"),
    ({"eval_benchmarks": [{"name": "he", "file": HE, "every": 3}]}, "eval_benchmarks[0]: unknown key 'every'"),
    ({"eval_benchmarks": [{"name": "valid", "file": HE}]}, "eval_benchmarks[0].name: 'valid' is reserved"),
    ({"eval_benchmarks": [{"name": "he", "file": HE}], "metric_for_best": "he/pass@5"},
     "metric_for_best: 'he/pass@5' is not a metric of this run (choose from loss, he/pass@1)"),
    ({"metric_for_best": "he/pass@1"}, "metric_for_best: 'he/pass@1' names a benchmark metric"),
    ({"eval_benchmarks": [3]}, "eval_benchmarks: expected a list of objects"),
    ({"eval_benchmarks": [{"name": "he", "file": str(ROOT)}]}, "eval_benchmarks[0].file: " + str(ROOT) + ": benchmark"),
])
def test_config_mistakes_are_one_line(tmp_path, updates, message):
    with pytest.raises(ConfigError) as e:
        train(engine_config(tmp_path / "out", **updates))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_a_platform_the_sandbox_refuses_stops_the_run_before_it_trains(tmp_path, monkeypatch):
    """As on a machine with neither Landlock nor namespaces: one line when training starts, not an
    error at the first evaluation hours later."""
    from mftcore.errors import SandboxError
    from mftcore.sandbox import executor

    monkeypatch.setitem(executor.ISOLATION, "auto", ("namespaces", "cgroup", "landlock"))
    with pytest.raises(SandboxError, match="^sandbox: this platform cannot confine reads and writes") as e:
        train(engine_config(tmp_path / "out", eval_benchmarks=BENCHMARKS[:1], **RUN))
    assert "\n" not in str(e.value) and not (tmp_path / "out" / "metrics.jsonl").exists()  # no step ran
