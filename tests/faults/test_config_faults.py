"""Hostile configs and overrides: every one stops `mftcore train` with exit code 2 and one line naming the
key (or file:line), before any tokenizing or training. Types and ranges come from TrainConfig's
annotations and tables (mftcore/config.py), the file through the strict JSON reader (mftcore/io.py)."""

import os

import pytest

from tests.faults.harness import base_config, check_refused, run_cli, write_json

# (id, config updates, overrides, names the error line must hold)
VALUE_CASES = [
    ("lr-string", {"learning_rate": "fast"}, [], ["learning_rate"]),
    ("weight-decay-string", {"weight_decay": "x"}, [], ["weight_decay"]),
    ("grad-norm-quoted", {"max_grad_norm": "1"}, [], ["max_grad_norm"]),
    ("warmup-quoted", {"num_warmup_steps": "10"}, [], ["num_warmup_steps"]),
    ("role-markers-string", {"role_markers": "x"}, [], ["role_markers"]),
    ("model-config-int", {"model_config": 3}, [], ["model_config"]),
    ("data-paths-null-item", {"data_paths": [None]}, [], ["data_paths"]),
    ("beta1-above-1", {"adam_beta1": 1.5}, [], ["adam_beta1"]),
    ("seed-negative", {"seed": -1}, [], ["seed"]),
    ("seq-length-bool", {"seq_length": True}, [], ["seq_length"]),
    ("batch-size-bool", {"per_device_train_batch_size": True}, [], ["per_device_train_batch_size"]),
    ("lr-negative", {"learning_rate": -1}, [], ["learning_rate"]),
    ("seq-length-2**63", {"padding_mode": "pack", "seq_length": 2**63 - 1}, [], ["seq_length"]),
    ("seq-length-above-cap", {"seq_length": (1 << 24) + 1}, [], ["seq_length", "at most"]),
    ("tokens-per-batch-int32", {"seq_length": 1 << 24, "per_device_train_batch_size": 256}, [], ["seq_length"]),
    ("no-training-share", {"data_split": "0,100,0", "max_train_steps": 5}, [], ["data_split"]),
    ("data-split-words", {"data_split": "most,some,none"}, [], ["data_split"]),
    ("accumulation-zero", {"gradient_accumulation_steps": 0}, [], ["gradient_accumulation_steps"]),
    ("dropout-one", {"lora_dropout": 1.0}, [], ["lora_dropout"]),
    ("loss-mode-unknown", {"weighted_loss_mode": "case9"}, [], ["weighted_loss_mode"]),
    ("unknown-key", {"lerning_rate": 1e-3}, [], ["lerning_rate", "learning_rate"]),
    ("task-weights-bool", {"task_weights": [True, 1, 1]}, [], ["task_weights"]),
    ("task-weights-count", {"task_weights": [1, 2]}, [], ["task_weights"]),
    ("target-modules-empty", {"target_modules": []}, [], ["target_modules"]),
    ("coba-tau-zero", {"weighted_loss_mode": "coba", "coba_tau": 0}, [], ["coba_tau"]),
    ("timeout-huge", {"init_timeout_seconds": 10**15}, [], ["init_timeout_seconds"]),
    ("min-lr-above-lr", {"min_lr": 1.0, "learning_rate": 0.1}, [], ["min_lr"]),
    ("warmup-fraction-1.5", {"num_warmup_steps": 1.5}, [], ["num_warmup_steps"]),
    ("eos-empty", {"eos_token": ""}, [], ["eos_token"]),
    ("max-steps-zero", {"max_train_steps": 0}, [], ["max_train_steps"]),
    ("int-beyond-int64", {"num_train_epochs": 10**30}, [], ["num_train_epochs", "out of range"]),
    ("model-type-int", {"model_config": {"model_type": 7}}, [], ["model_config"]),
    ("model-type-unknown", {"model_config": {"model_type": "no_such_family"}}, [], ["model_config"]),
    ("heads-do-not-divide", {"model_config": {"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3,
                                              "num_hidden_layers": 1}}, [], ["model_config"]),
    ("kv-heads-do-not-divide", {"model_config": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                                 "num_key_value_heads": 3, "num_hidden_layers": 1}}, [],
     ["model_config"]),
    ("layers-negative", {"model_config": {"model_type": "llama", "num_hidden_layers": -1}}, [], ["model_config"]),
    ("nan-inside-model-config", {"model_config": {"model_type": "llama", "rope_theta": float("nan")}}, [],
     ["model_config.rope_theta", "finite"]),
    ("distributed-unknown", {"distributed_type": "mpi"}, [], ["distributed_type"]),
    ("precision-unknown", {"mixed_precision": "fp8"}, [], ["mixed_precision"]),
    ("output-dir-empty", {"output_dir": ""}, [], ["output_dir"]),
    ("override-empty-value", {}, ["learning_rate="], ["learning_rate"]),
    ("override-no-equals", {}, ["learning_rate"], ["learning_rate"]),
    ("override-nan", {}, ["learning_rate=NaN"], ["learning_rate", "finite"]),
    ("override-infinity", {}, ["learning_rate=Infinity"], ["learning_rate", "finite"]),
    ("override-task-weights-nan", {}, ["task_weights=[NaN,1,1]"], ["task_weights"]),
    ("override-duplicate-key", {}, ['model_config={"model_type": "llama", "model_type": "gpt2"}'],
     ["model_config", "duplicate key"]),
    ("override-deep-nesting", {}, ["model_config=" + "[" * 100000 + "]" * 100000], ["model_config", "nested"]),
    ("override-unknown-key", {}, ["sequence_length=5"], ["sequence_length"]),
]


@pytest.mark.parametrize("updates,overrides,names", [c[1:] for c in VALUE_CASES], ids=[c[0] for c in VALUE_CASES])
def test_bad_value_is_one_line(tmp_path, capfd, updates, overrides, names):
    path = write_json(tmp_path / "c.json", base_config(tmp_path, **updates))
    check_refused(run_cli(capfd, ["train", path, *overrides]), *names)
    assert not os.path.exists(tmp_path / "cache"), "stopped before tokenizing anything"


def raw_file(text: bytes):
    def make(tmp_path):
        path = tmp_path / "c.json"
        path.write_bytes(text)
        return str(path)
    return make


def config_text(tmp_path, **updates) -> str:
    import json

    return json.dumps(base_config(tmp_path, **updates), indent=1)


def with_text(edit):
    """A config file whose text is the valid one with `edit(text)` applied (it returns text or bytes)."""
    def make(tmp_path):
        path = tmp_path / "c.json"
        edited = edit(config_text(tmp_path))
        path.write_bytes(edited.encode("utf-8") if isinstance(edited, str) else edited)
        return str(path)
    return make


def fifo(tmp_path):
    path = tmp_path / "c.json"
    os.mkfifo(path)
    return str(path)


def directory(tmp_path):
    (tmp_path / "c.json").mkdir()
    return str(tmp_path / "c.json")


def output_dir_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    return write_json(tmp_path / "c.json", base_config(tmp_path, output_dir=str(tmp_path / "taken")))


def output_dir_below_a_file(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    return write_json(tmp_path / "c.json", base_config(tmp_path, output_dir=str(tmp_path / "taken" / "run")))


def cache_dir_is_a_file(tmp_path):
    (tmp_path / "cachefile").write_text("x")
    return write_json(tmp_path / "c.json", base_config(tmp_path, cache_dir=str(tmp_path / "cachefile")))


def tokenizer_empty_dir(tmp_path):
    (tmp_path / "tok").mkdir()
    return write_json(tmp_path / "c.json", base_config(tmp_path, tokenizer_path=str(tmp_path / "tok")))


def tokenizer_damaged(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    return write_json(tmp_path / "c.json", base_config(tmp_path, tokenizer_path=str(tmp_path / "tok")))


def pretrained_is_a_file(tmp_path):
    (tmp_path / "model").write_text("x")
    return write_json(tmp_path / "c.json", base_config(tmp_path, pretrained_model_path=str(tmp_path / "model"),
                                                       model_config=None))


# (id, make(tmp_path) -> config path, names the error line must hold)
FILE_CASES = [
    ("duplicate-key", with_text(lambda t: t.replace('"learning_rate": 0.003', '"learning_rate": 0.003,\n '
                                                                             '"learning_rate": 1')),
     ["duplicate key 'learning_rate'", "c.json:"]),
    ("invalid-utf8", with_text(lambda t: t.encode().replace(b'/out"', b'/o\xffut"')), ["c.json:", "invalid UTF-8"]),
    ("utf16", with_text(lambda t: t.encode("utf-16")), ["c.json:1", "UTF-16"]),
    ("lone-surrogate", with_text(lambda t: t.replace('/out"', '/out\\ud800"')), ["c.json:", "lone surrogate"]),
    ("nan-literal", with_text(lambda t: t.replace('"learning_rate": 0.003', '"learning_rate": NaN')),
     ["learning_rate", "finite"]),
    ("infinity-literal", with_text(lambda t: t.replace('"learning_rate": 0.003', '"learning_rate": Infinity')),
     ["learning_rate", "finite"]),
    ("deep-nesting", with_text(lambda t: t.replace('"seq_length": 256', '"seq_length": ' + "[" * 100000
                                                    + "]" * 100000)), ["c.json", "nested"]),
    ("nesting-65", with_text(lambda t: t.replace('"seq_length": 256', '"seq_length": ' + "[" * 65 + "]" * 65)),
     ["c.json", "nested more than 64"]),
    ("huge-integer", with_text(lambda t: t.replace('"seq_length": 256', '"seq_length": ' + "9" * 5000)),
     ["c.json", "invalid JSON"]),
    ("truncated", with_text(lambda t: t[:len(t) // 2]), ["c.json:", "invalid JSON"]),
    ("empty-file", raw_file(b""), ["c.json:1", "invalid JSON"]),
    ("json-list", raw_file(b"[1, 2]"), ["c.json", "JSON object"]),
    ("fifo", fifo, ["c.json", "not a regular file", "FIFO"]),
    ("directory", directory, ["c.json", "not a regular file"]),
    ("output-dir-is-a-file", output_dir_is_a_file, ["output_dir", "not a directory"]),
    ("output-dir-below-a-file", output_dir_below_a_file, ["output_dir", "is a file"]),
    ("cache-dir-is-a-file", cache_dir_is_a_file, ["cache_dir", "not a directory"]),
    ("tokenizer-empty-dir", tokenizer_empty_dir, ["tokenizer_path", "no tokenizer"]),
    ("tokenizer-damaged", tokenizer_damaged, ["tokenizer_path", "cannot be loaded"]),
    ("pretrained-is-a-file", pretrained_is_a_file, ["pretrained_model_path", "not a directory"]),
]


@pytest.mark.parametrize("make,names", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_config_file_is_one_line(tmp_path, capfd, make, names):
    check_refused(run_cli(capfd, ["train", make(tmp_path)]), *names)


def test_missing_config_file(tmp_path, capfd):
    check_refused(run_cli(capfd, ["train", tmp_path / "nope.json"]), "nope.json", "config file not found")


def test_debug_shows_the_traceback(tmp_path, capfd):
    from mftcore.errors import ConfigError

    path = write_json(tmp_path / "c.json", base_config(tmp_path, learning_rate="fast"))
    with pytest.raises(ConfigError, match="learning_rate"):
        run_cli(capfd, ["--debug", "train", path])
