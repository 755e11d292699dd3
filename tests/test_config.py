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


def test_every_numeric_key_has_a_range():
    """A key typed int or float (alone or in an Optional/Union) is checked against a range, not only a
    type: a new numeric key without one fails here."""
    import dataclasses
    import typing

    from mftcore import config

    checked = set(config.POSITIVE_INTS) | set(config.NON_NEGATIVE_INTS) | set(config.POSITIVE_INTS_OR_NULL) \
        | set(config.NON_NEGATIVE_NUMBERS) | set(config.RANGES)
    hints = typing.get_type_hints(TrainConfig)
    numeric = [f.name for f in dataclasses.fields(TrainConfig)
               if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))]
    assert numeric and [name for name in numeric if name not in checked] == []


@pytest.mark.parametrize("text, problem", [
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ("[" * 65 + "]" * 65, "nested more than 64"),
    ('{"a": "\\ud800"}', "lone surrogate"),
    (b'{"a": "\xff"}', "invalid UTF-8"),
    (b"\xff\xfe{}", "UTF-16"),
])
def test_the_strict_json_reader(text, problem):
    from mftcore.io import JsonProblem, parse_json

    with pytest.raises(JsonProblem, match=problem):
        parse_json(text)
    assert parse_json(b'\xef\xbb\xbf{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a BOM, a surrogate pair
