"""Config loading, overrides and the one-line errors of the CLI."""

import json
import subprocess
import sys

import pytest

from mftcore.cli import main
from mftcore.config import TrainConfig, parse_value
from mftcore.errors import ConfigError

BASE = {"data_paths": ["a"], "tokenizer_path": "t", "model_config": {"model_type": "llama"}}


def test_mftcoder_list_string_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**BASE, "data_paths": "[x/a,y/b]", "task_weights": "[1,3]"}))
    cfg = TrainConfig.from_file(str(path), ["learning_rate=1e-4", "output_dir=runs/x", "max_train_steps=7"])
    assert cfg.data_paths == ["x/a", "y/b"] and cfg.task_weights == [1.0, 3.0]
    assert cfg.learning_rate == 1e-4 and cfg.output_dir == "runs/x" and cfg.max_train_steps == 7
    assert cfg.role_markers["user"] == "<s>human\n"


def test_parse_value_reads_json_else_string():
    assert parse_value("3") == 3 and parse_value("true") is True and parse_value("null") is None
    assert parse_value("[1, 2]") == [1, 2] and parse_value("cosine") == "cosine"


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'; did you mean 'learning_rate'"):
        TrainConfig.from_dict({**BASE, "learning_rat": 1.0})


@pytest.mark.parametrize("update, key", [
    ({"seq_length": 0}, "seq_length"),
    ({"min_lr": 1.0, "learning_rate": 0.1}, "min_lr"),
    ({"data_split": "98,2"}, "data_split"),
    ({"task_weights": [1, 2]}, "task_weights"),
    ({"padding_mode": "concat"}, "padding_mode"),
    ({"role_markers": {"bot": "x"}}, "role_markers"),
    ({"model_config": None}, "pretrained_model_path"),
])
def test_bad_values_name_the_key(update, key):
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_dict({**BASE, **update})


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{\n  "data_paths": ["a"],\n  "seed": ,\n}\n')
    with pytest.raises(ConfigError, match=r"c\.json:3: invalid JSON"):
        TrainConfig.from_file(str(path))


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**BASE, "lerning_rate": 1}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lerning_rate" in err[0] and "learning_rate" in err[0]


def test_console_script_missing_config_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mftcore", "train", str(tmp_path / "missing.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mftcore: error: {tmp_path / 'missing.json'}: config file not found"


def test_bad_data_line_from_the_cli(tmp_path, tiny_config):
    bad = tmp_path / "task"
    bad.mkdir()
    (bad / "d.jsonl").write_text('{"chat_rounds": [{"role": "human", "content": "q"}]}\n{oops\n')
    path, _ = tiny_config(data_paths=[str(bad)])
    proc = subprocess.run([sys.executable, "-m", "mftcore", "train", path], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"mftcore: error: {bad / 'd.jsonl'}:2: invalid JSON: "
                                                "Expecting property name enclosed in double quotes (column 2)"]
