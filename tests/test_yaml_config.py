"""YAML configs: the same keys as JSON and the same one-line errors with file:line (mftcore/yamlconfig.py)."""

import dataclasses
import glob
import json
import os

import pytest
import yaml

from mftcore.cli import main
from mftcore.config import TrainConfig
from mftcore.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# configs/deepspeed_zero*.json are DeepSpeed's own files, not training configs
TRAINING_CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.json"))
                          if "data_paths" in json.load(open(p)))


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_every_shipped_config_reads_the_same_as_yaml(tmp_path, name, suffix):
    assert len(TRAINING_CONFIGS) >= 8
    src = os.path.join(ROOT, "configs", name)
    raw = json.load(open(src))
    path = tmp_path / (name[:-5] + suffix)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    as_yaml = dataclasses.asdict(TrainConfig.from_file(str(path), ["seed=7"]))
    as_json = dataclasses.asdict(TrainConfig.from_file(src, ["seed=7"]))
    assert as_yaml == as_json


def test_yaml_values_are_json_kinds(tmp_path):
    path = tmp_path / "c.yaml"
    # 1e-4 without a dot is a string under YAML 1.1's resolver; a date-like string stays a string
    path.write_text("data_paths: [a]\ntokenizer_path: '2024-01-01'\nmodel_config: {model_type: llama}\n"
                    "learning_rate: 1e-4\nweight_decay: 0.5\n")
    cfg = TrainConfig.from_file(str(path))
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.tokenizer_path == "2024-01-01"


BASE = "data_paths: [a]\ntokenizer_path: t\nmodel_config: {model_type: llama}\n"


@pytest.mark.parametrize("text, problem", [
    (BASE + "seed: 1\nseed: 2\n", r"c\.yaml:5: duplicate key 'seed'"),
    ("data_paths: [a]\nmodel_config:\n  model_type: llama\n  model_type: x\n", r"c\.yaml:4: duplicate key 'model_type'"),
    (BASE + "seed: [1,\n", r"c\.yaml:\d+: invalid YAML"),
    (BASE + "seed: 1\n  bad: indent\n", r"c\.yaml:5: invalid YAML"),
    ("- 1\n- 2\n", r"c\.yaml: must hold a YAML mapping .*got list"),
    ("", r"c\.yaml: must hold a YAML mapping .*empty"),
    ("just text\n", r"c\.yaml: must hold a YAML mapping .*got str"),
    (BASE + "learning_rate: .nan\n", r"c\.yaml: learning_rate: must be a finite number, got nan"),
    (BASE + "num_warmup_steps: -.inf\n", r"c\.yaml: num_warmup_steps: must be a finite number, got -inf"),
    (BASE + "data_weights: [1, .inf]\n", r"c\.yaml: data_weights\[1\]: must be a finite number"),
    (BASE + "seed: !!binary aGk=\n", r"c\.yaml:4: invalid YAML: could not determine a constructor"),
    (BASE + "1: x\n", r"c\.yaml:4: keys must be strings"),
    (BASE + "---\nseed: 1\n", r"c\.yaml:4: invalid YAML: .*single document"),
    (BASE + "lerning_rate: 1\n", r"c\.yaml: .*lerning_rate.*learning_rate"),
    (BASE + "gradient_checkpointing: yes\n", r"c\.yaml:4: 'yes' is a boolean in YAML 1\.1 .*true or false, or quote"),
    (BASE + "early_stopping: Off\n", r"c\.yaml:4: 'Off' is a boolean in YAML 1\.1"),
    ("data_paths: [a]\nmodel_config:\n  model_type: llama\n  tie_word_embeddings: NO\n", r"c\.yaml:4: 'NO' is a boolean"),
])
def test_yaml_errors_are_json_errors(tmp_path, text, problem):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        TrainConfig.from_file(str(path))


def test_yaml_booleans_are_true_and_false_only_quoted_words_are_strings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "gradient_checkpointing: False\nearly_stopping: TRUE\neos_token: 'no'\n")
    cfg = TrainConfig.from_file(str(path))
    assert cfg.gradient_checkpointing is False and cfg.early_stopping is True and cfg.eos_token == "no"


def test_merge_keys_override_but_own_keys_do_not_repeat():
    from mftcore.io import JsonProblem
    from mftcore.yamlconfig import parse_yaml

    text = "base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  y: 3\n"
    assert parse_yaml(text) == {"base": {"x": 1, "y": 2}, "d": {"x": 1, "y": 3}}
    with pytest.raises(JsonProblem, match="duplicate key 'y'") as e:
        parse_yaml(text + "  y: 4\n")
    assert e.value.line == 5


def test_json_nan_is_refused_the_same_way(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data_paths": ["a"], "tokenizer_path": "t", "model_config": {"model_type": "llama"},
                                "learning_rate": float("nan")}))
    with pytest.raises(ConfigError, match=r"c\.json: learning_rate: must be a finite number, got nan"):
        TrainConfig.from_file(str(path))


def test_cli_yaml_error_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yml"
    path.write_text(BASE + "seed: 1\nseed: 2\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:5: duplicate key 'seed'" in err[0]
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: config file not found" in capsys.readouterr().err
