"""Trust: a checkpoint or model received from someone else decides nothing that runs here. Code runs only
with the user's own --trust_remote_code on the command line (a trust_remote_code inside a checkpoint's
saved config is ignored), a `format` claim in trainer_state.json is checked against the files, and a
pickle that names anything beyond plain tensors and containers is refused in one line before any
unpickler sees it (mftcore/integrity.py). Each case's Payload would create a marker file if it ran."""

import json
import os
import shutil

import pytest
import torch

from tests.faults.harness import Payload, check_refused, restamp, run_cli


@pytest.fixture
def checkpoint(trained_run, tmp_path):
    """A copy of the trained run's checkpoint-3, and the marker its payloads would create."""
    Payload.marker = tmp_path / "code-ran"
    ckpt = tmp_path / "received" / "checkpoint-3"
    shutil.copytree(os.path.join(trained_run["output_dir"], "checkpoint-3"), ckpt)
    return ckpt


def edit_json(path, **changes):
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


def custom_code_model(tmp_path, tiny_pretrained):
    """A model directory whose config asks for its own code (which would create the marker)."""
    model = tmp_path / "custom"
    shutil.copytree(tiny_pretrained, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(f"open({str(Payload.marker)!r}, 'w').close()\n")
    return model


def test_export_ignores_trust_remote_code_in_the_checkpoints_config(checkpoint, tmp_path, capfd, tiny_pretrained):
    model = custom_code_model(tmp_path, tiny_pretrained)
    edit_json(checkpoint / "mftcore_config.json", trust_remote_code=True, pretrained_model_path=str(model),
              model_config=None)
    restamp(checkpoint)
    outcome = run_cli(capfd, ["export", checkpoint, tmp_path / "out"])
    check_refused(outcome, "pretrained_model_path", "its own code")
    assert "only --trust_remote_code on this command line" in outcome.err
    assert not Payload.marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("claim", ["dcp", "deepspeed", "hf-but-not-really"])
def test_export_checks_a_format_claim_against_the_files(checkpoint, tmp_path, capfd, claim):
    edit_json(checkpoint / "trainer_state.json", format=claim)
    restamp(checkpoint)
    check_refused(run_cli(capfd, ["export", checkpoint, tmp_path / "out"]), "export", f"format {claim!r}", "'hf'")


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state_0.pt"])
def test_a_pickle_payload_is_refused_in_one_line(checkpoint, tmp_path, capfd, name):
    torch.save({"state": Payload()}, checkpoint / name)
    restamp(checkpoint)
    outcome = run_cli(capfd, ["export", checkpoint, tmp_path / "out"])
    check_refused(outcome, name, "refused", "weights_only")
    assert not Payload.marker.exists()


def fake_engine_checkpoint(checkpoint, fmt: str):
    """The HF files removed and another engine's in their place, every one of them a payload."""
    for name in ("model.safetensors", "optimizer.pt"):
        os.remove(checkpoint / name)
    if fmt == "dcp":
        (checkpoint / "dcp").mkdir()
        import pickle

        (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    else:
        (checkpoint / "deepspeed").mkdir()
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            torch.save({"module": Payload()}, checkpoint / "deepspeed" / name)
    edit_json(checkpoint / "trainer_state.json", format=fmt)
    restamp(checkpoint)


@pytest.mark.parametrize("fmt", ["dcp", "deepspeed"])
def test_engine_pickles_are_checked_before_the_engine_unpickles_them(checkpoint, tmp_path, capfd, fmt):
    fake_engine_checkpoint(checkpoint, fmt)
    for argv in (["export", checkpoint, tmp_path / "out"],):
        check_refused(run_cli(capfd, argv), "refused")
    assert not Payload.marker.exists()


def test_generate_needs_the_flag_for_a_models_own_code(tmp_path, capfd, tiny_pretrained):
    Payload.marker = tmp_path / "code-ran"
    model = custom_code_model(tmp_path, tiny_pretrained)
    outcome = run_cli(capfd, ["generate", "--model", model, "--prompt", "hi"])
    check_refused(outcome, "--model", "trust_remote_code")
    assert not Payload.marker.exists()


def test_merge_needs_the_flag_for_a_models_own_code(tmp_path, capfd, tiny_pretrained):
    Payload.marker = tmp_path / "code-ran"
    model = custom_code_model(tmp_path, tiny_pretrained)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    outcome = run_cli(capfd, ["merge", "--base", model, "--adapter", adapter, "--out", tmp_path / "merged"])
    check_refused(outcome, "trust_remote_code")
    assert not Payload.marker.exists()
