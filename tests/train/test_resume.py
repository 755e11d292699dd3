"""Exact resume: a run killed (SIGKILL, at a step or in the middle of writing a checkpoint) or stopped
(SIGTERM) and resumed ends bitwise equal to a run that never stopped."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from mftcore import checkpoint
from mftcore.errors import ConfigError
from mftcore.integrity import CheckpointError
from mftcore.train import train
from tests.faults.harness import restamp
from tests.helpers.engine import assert_bitwise_equal, engine_config, read_metrics, tensors, write_config
from tests.helpers.paths import TINY_MODEL

# Attention dropout draws from the torch RNG every step, CoBa keeps a loss history and a validation
# position, accumulation splits steps: each is state that resume has to carry.
RUN = dict(model_config={**TINY_MODEL, "attention_dropout": 0.1}, weighted_loss_mode="coba", coba_warmup_steps=2,
           coba_history_length=3, per_device_train_batch_size=4, per_device_eval_batch_size=4,
           gradient_accumulation_steps=2, max_train_steps=6, checkpointing_steps=2, evaluation_steps=3)

# Runs `mftcore train` in a fresh process that kills (or terminates) itself at a chosen moment.
DRIVER = r"""
import os, signal, sys
import torch
torch.set_num_threads(int(sys.argv[4]))
import mftcore.train, mftcore.cli
how, at = sys.argv[2], int(sys.argv[3])
calls = [0]
def on_call(fn, sig):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), sig)
        return fn(*args, **kwargs)
    return wrapped
if how == "kill-at-step":
    mftcore.train.train_step = on_call(mftcore.train.train_step, signal.SIGKILL)
elif how == "kill-in-save":  # the n-th torch.save: inside a checkpoint being written
    torch.save = on_call(torch.save, signal.SIGKILL)
else:
    mftcore.train.train_step = on_call(mftcore.train.train_step, signal.SIGTERM)
sys.exit(mftcore.cli.main(["train", sys.argv[1]]))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    final = train(engine_config(out, **RUN))
    return out, tensors(final)


def run_driver(tmp_path, how: str, at: int):
    cfg_path = write_config(tmp_path / "cfg.json", tmp_path / "out", **RUN)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.run([sys.executable, str(script), cfg_path, how, str(at), str(torch.get_num_threads())],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("how,at,resumes_from", [
    ("kill-at-step", 5, 4),  # killed before step 5: continues from checkpoint-4
    ("kill-in-save", 8, 3),  # killed while writing checkpoint-4 (its 2nd file): continues from checkpoint-3
    ("terminate", 5, 5),  # SIGTERM during step 5: the step finishes, checkpoint-5 is saved, exit 143
])
def test_stopped_run_resumes_bitwise_equal(tmp_path, reference, how, at, resumes_from):
    proc = run_driver(tmp_path, how, at)
    out = tmp_path / "out"
    if how == "terminate":
        assert proc.returncode == 143, proc.stderr
        assert "stopped by SIGTERM after step 5" in proc.stderr and "Traceback" not in proc.stderr
    else:
        assert proc.returncode == -9, proc.stderr
    assert not (out / "final").exists()
    assert checkpoint.list_checkpoints(str(out))[-1][0] == resumes_from
    if how == "kill-in-save":
        assert any(name.startswith(".tmp-checkpoint-4") for name in os.listdir(out))

    final = train(engine_config(out, resume_from_checkpoint="auto", **RUN))
    ref_out, ref_weights = reference
    assert_bitwise_equal(tensors(final), ref_weights)
    assert not any(name.startswith(".tmp-") for name in os.listdir(out))
    # The resumed log continues the stopped one: one train record per step, the same losses.
    got = [(r["step"], r["loss"]) for r in read_metrics(out, "train")]
    assert got == [(r["step"], r["loss"]) for r in read_metrics(ref_out, "train")]


def test_lora_resume_from_a_path_is_bitwise_equal(tmp_path, tiny_pretrained):
    """LoRA (dropout 0.05 draws from the RNG every step): checkpoint-3 of one run, continued elsewhere."""
    run = dict(pretrained_model_path=tiny_pretrained, peft_type="lora", lora_rank=4, max_train_steps=5,
               checkpointing_steps=3, learning_rate=1e-2)
    first = train(engine_config(tmp_path / "a", **run))
    second = train(engine_config(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"), **run))
    assert_bitwise_equal(tensors(second, "adapter_model.safetensors"), tensors(first, "adapter_model.safetensors"))


def test_packed_resume_across_epochs_is_bitwise_equal(tmp_path):
    """Packing: ~16 steps per epoch, resumed at step 15, runs through two reshuffles (epochs 1 and 2) and
    must draw the same packed rows in the same order as the run that never stopped."""
    run = dict(padding_mode="pack", per_device_train_batch_size=4, gradient_accumulation_steps=2,
               max_train_steps=40, checkpointing_steps=15)
    first = train(engine_config(tmp_path / "a", **run))
    # epoch is logged fractional, epochs done: (0, 1] is the first epoch's steps
    assert {math.ceil(r["epoch"]) - 1 for r in read_metrics(tmp_path / "a", "train")} == {0, 1, 2}
    second = train(engine_config(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-15"), **run))
    assert_bitwise_equal(tensors(second), tensors(first))
    resumed = [(r["step"], r["loss"], r["task_tokens"]) for r in read_metrics(tmp_path / "b", "train")]
    assert resumed == [(r["step"], r["loss"], r["task_tokens"]) for r in read_metrics(tmp_path / "a", "train")][15:]


def test_checkpoint_holds_everything_and_loads_without_unpickling_code(tmp_path):
    out = tmp_path / "out"
    train(engine_config(out, max_train_steps=2, checkpointing_steps=2, weighted_loss_mode="self-paced",
                        selfpaced_history_length=2))
    ckpt = out / "checkpoint-2"
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state_0.pt",
            "trainer_state.json"} <= set(os.listdir(ckpt))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
        torch.load(ckpt / name, weights_only=True)
    AutoModelForCausalLM.from_pretrained(ckpt, use_safetensors=True)  # a plain HF model directory
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data"]["epoch"] == 0 and state["data"]["step_in_epoch"] == 2
    assert state["data"]["consumed"] == 2 * 8 and state["data"]["units_per_step"] == 8
    assert state["weighted_loss_mode"] == "self-paced" and len(state["loss_mode"]["steps"]) == 2

    # A pickle that runs code when unpickled, in place of the optimizer state: resume must refuse it.
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state": Payload()}, ckpt / "optimizer.pt")
    resume = engine_config(out, max_train_steps=3, resume_from_checkpoint=str(ckpt),
                           weighted_loss_mode="self-paced", selfpaced_history_length=2)
    with pytest.raises(CheckpointError, match="optimizer.pt: .* the manifest says"):  # the manifest sees the swap
        train(resume)
    restamp(ckpt)  # and one who fixes the manifest too meets the unpickling guard
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        train(resume)
    assert not marker.exists()


def test_resume_choices(tmp_path):
    out = tmp_path / "out"
    assert checkpoint.resolve_resume(engine_config(out, resume_from_checkpoint="auto")) is None  # fresh
    train(engine_config(out, max_train_steps=1))
    with pytest.raises(ConfigError, match="output_dir: .* already holds checkpoint-1 .* auto_resume is false"):
        train(engine_config(out, max_train_steps=1, auto_resume=False))
    # MFTCoder's default, auto_resume: a restarted job continues from the newest checkpoint.
    assert checkpoint.resolve_resume(engine_config(out)) == str(out / "checkpoint-1")
    train(engine_config(out, max_train_steps=2))
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2]
    with pytest.raises(ConfigError, match="resume_from_checkpoint: .*nowhere: not a checkpoint"):
        checkpoint.resolve_resume(engine_config(out, resume_from_checkpoint=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="weighted_loss_mode: .* was trained with 'case3'"):
        train(engine_config(out, max_train_steps=2, resume_from_checkpoint="auto", weighted_loss_mode="coba"))


def test_saving_limit_keeps_the_best_and_the_latest(tmp_path):
    for step in range(1, 7):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    removed = checkpoint.prune_checkpoints(str(tmp_path), 3, {2, 6})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-5", "checkpoint-6"]
    assert len(removed) == 3
    checkpoint.prune_checkpoints(str(tmp_path), 1, {2, 6})  # the limit yields to best and latest
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-6"]
    assert checkpoint.prune_checkpoints(str(tmp_path), None, {6}) == []
