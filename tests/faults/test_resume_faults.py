"""Resuming from damaged checkpoints. The reference run trains 3 steps with a checkpoint after each. A case
copies its output_dir back to step 2 (checkpoint-3 and final/ removed) and damages checkpoint-2 the
way a full disk, a bad copy or a meddler would. Auto-resume must name the damaged checkpoint, fall back
to checkpoint-1, never delete the damaged one (it is kept as checkpoint-2.damaged when the run saves
its own checkpoint-2) and end bitwise equal to the reference; an explicit resume_from_checkpoint that
is damaged is one line naming it (mftcore/checkpoint.py: checkpoint_problem)."""

import json
import os
import shutil

import pytest
import torch

from tests.faults.harness import Payload, check_refused, check_succeeded, restamp, run_cli, snapshot, write_json
from tests.helpers.engine import assert_bitwise_equal, read_metrics, tensors


@pytest.fixture(scope="module")
def reference(trained_run):
    return trained_run["root"], trained_run["config"]


def at_step_2(reference, tmp_path, **updates):
    """A copy of the reference run as it was after step 2: (config path, output_dir)."""
    root, cfg = reference
    out = tmp_path / "out"
    shutil.copytree(cfg["output_dir"], out)
    shutil.rmtree(out / "checkpoint-3")
    shutil.rmtree(out / "final")
    return write_json(tmp_path / "c.json", {**cfg, "output_dir": str(out), **updates}), out


def truncate(name, keep=0.5):
    def damage(ckpt):
        path = ckpt / name
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(int(size * keep))
    return damage


def zero_fill(name):
    def damage(ckpt):
        size = os.path.getsize(ckpt / name)
        (ckpt / name).write_bytes(b"\0" * size)
    return damage


def delete(name):
    return lambda ckpt: os.remove(ckpt / name)


def write(name, data: bytes):
    return lambda ckpt: (ckpt / name).write_bytes(data)


def append(name, data: bytes):
    def damage(ckpt):
        with open(ckpt / name, "ab") as f:
            f.write(data)
    return damage


def edit_state(**changes):
    def damage(ckpt):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        for key, value in changes.items():
            if "." in key:
                outer, inner = key.split(".")
                state[outer][inner] = value
            else:
                state[key] = value
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        restamp(ckpt)  # a meddler who also fixes the manifest: the state's own checks must catch it
    return damage


def empty(ckpt):
    shutil.rmtree(ckpt)
    ckpt.mkdir()


def pickle_payload(name):
    def damage(ckpt):
        torch.save({"state": Payload()}, ckpt / name)
    return damage


# (id, damage(checkpoint dir), what the note about it names)
DAMAGES = [
    ("weights-truncated", truncate("model.safetensors"), "model.safetensors"),
    ("weights-zero-filled", zero_fill("model.safetensors"), "model.safetensors"),
    ("weights-missing", delete("model.safetensors"), "model.safetensors"),
    ("weights-extra-bytes", append("model.safetensors", b"\0" * 16), "model.safetensors"),
    ("optimizer-missing", delete("optimizer.pt"), "optimizer.pt"),
    ("optimizer-truncated", truncate("optimizer.pt", 0.7), "optimizer.pt"),
    ("optimizer-pickle-payload", pickle_payload("optimizer.pt"), "optimizer.pt"),
    ("rng-missing", delete("rng_state_0.pt"), "rng_state_0.pt"),
    ("rng-pickle-payload", pickle_payload("rng_state_0.pt"), "rng_state_0.pt"),
    ("scheduler-zero-filled", zero_fill("scheduler.pt"), "scheduler.pt"),
    ("state-not-json", write("trainer_state.json", b"{\"step\": 2, "), "trainer_state.json"),
    ("state-duplicate-key", write("trainer_state.json", b'{"step": 2, "step": 1, "data": {}}'), "duplicate key"),
    ("state-missing", delete("trainer_state.json"), "trainer_state.json"),
    ("state-step-mismatch", edit_state(step=3), "trainer_state.json"),
    ("state-epoch-string", edit_state(**{"data.epoch": "zero"}), "data.epoch"),
    ("state-best-loss-string", edit_state(best_loss="low"), "best_loss"),
    ("format-claims-dcp", edit_state(format="dcp"), "format 'dcp'"),
    ("format-claims-deepspeed", edit_state(format="deepspeed"), "format 'deepspeed'"),
    ("model-config-truncated", truncate("config.json"), "config.json"),
    ("training-config-invalid", write("mftcore_config.json", b"{oops"), "mftcore_config.json"),
    ("manifest-file-missing", delete("generation_config.json"), "generation_config.json"),
    ("empty-directory", empty, "trainer_state.json"),
]


@pytest.mark.parametrize("damage,named", [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES])
def test_auto_resume_falls_back_to_the_newest_intact_checkpoint(reference, tmp_path, capfd, damage, named):
    config, out = at_step_2(reference, tmp_path)
    Payload.marker = tmp_path / "code-ran"
    damage(out / "checkpoint-2")
    damaged = snapshot(out / "checkpoint-2")
    outcome = run_cli(capfd, ["train", config])
    check_succeeded(outcome)
    note = next(line for line in outcome.err.splitlines() if "is damaged" in line)
    assert "checkpoint-2" in note and named in note
    assert f"resuming from {out / 'checkpoint-1'}" in outcome.err
    ref_out = reference[1]["output_dir"]
    assert_bitwise_equal(tensors(out / "final"), tensors(os.path.join(ref_out, "final")))
    assert snapshot(out / "checkpoint-2.damaged") == damaged, "the damaged checkpoint was not kept as it was"
    assert not Payload.marker.exists(), "a pickle in the checkpoint ran code"


EXPLICIT = ["weights-truncated", "optimizer-missing", "optimizer-pickle-payload", "state-not-json",
            "format-claims-dcp", "scheduler-zero-filled"]


@pytest.mark.parametrize("damage,named", [d[1:] for d in DAMAGES if d[0] in EXPLICIT], ids=EXPLICIT)
def test_an_explicit_damaged_checkpoint_is_one_line(reference, tmp_path, capfd, damage, named):
    config, out = at_step_2(reference, tmp_path)
    Payload.marker = tmp_path / "code-ran"
    damage(out / "checkpoint-2")
    outcome = run_cli(capfd, ["train", config, f"resume_from_checkpoint={out / 'checkpoint-2'}"])
    check_refused(outcome, "resume_from_checkpoint", "checkpoint-2", "damaged", named.split()[0])
    assert (out / "checkpoint-2").is_dir() and not Payload.marker.exists()


def test_every_checkpoint_damaged_is_one_line(reference, tmp_path, capfd):
    config, out = at_step_2(reference, tmp_path)
    delete("optimizer.pt")(out / "checkpoint-1")
    truncate("model.safetensors")(out / "checkpoint-2")
    check_refused(run_cli(capfd, ["train", config]), "every checkpoint", "checkpoint-2")
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()


def test_a_partial_metrics_line_is_dropped_on_resume(reference, tmp_path, capfd):
    """What a full disk (or a kill mid-append by an older version) leaves at the end of metrics.jsonl."""
    config, out = at_step_2(reference, tmp_path)
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "split": "train", "lo')
    check_succeeded(run_cli(capfd, ["train", config]))
    ref_out = reference[1]["output_dir"]
    records = [(r["step"], r["split"], r["loss"]) for r in read_metrics(out)]
    assert records == [(r["step"], r["split"], r["loss"]) for r in read_metrics(ref_out)]
    assert_bitwise_equal(tensors(out / "final"), tensors(os.path.join(ref_out, "final")))


def test_another_model_config_is_one_line(reference, tmp_path, capfd):
    root, cfg = reference
    config, out = at_step_2(reference, tmp_path, model_config={**cfg["model_config"], "hidden_size": 64})
    check_refused(run_cli(capfd, ["train", config]), "model_config", "hidden_size", "checkpoint-2")


def test_other_data_mid_epoch_is_refused_not_replayed(reference, tmp_path, capfd):
    config, out = at_step_2(reference, tmp_path, data_split="90,10,0")
    check_refused(run_cli(capfd, ["train", config]), "resume_from_checkpoint", "mid-epoch", "no exact continuation")


def test_another_batch_size_continues_the_epoch_exactly(reference, tmp_path, capfd):
    """The epoch goes on from the checkpoint's sample, 4 a step instead of 8: nothing skipped or repeated."""
    config, out = at_step_2(reference, tmp_path, per_device_train_batch_size=4, max_train_steps=4)
    check_succeeded(run_cli(capfd, ["train", config]))
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["data"]["consumed"] == 2 * 8 + 2 * 4 and state["data"]["units_per_step"] == 4
    assert [r["step"] for r in read_metrics(out, "train")] == list(range(1, 5))
