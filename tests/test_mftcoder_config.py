"""MFTCoder's train configs and command-line flags: every key of its MftTrainArgs is accepted with its
meaning, or refused in one line when mftcore deliberately does not support the value."""

import dataclasses
import glob
import json
import os

import pytest

from mftcore import mftcoder
from mftcore.cli import build_parser, main, train_config_and_overrides
from mftcore.config import TrainConfig
from mftcore.errors import ConfigError
from mftcore.model.load import resolve_attn_implementation
from tests.helpers.paths import DATA, ROOT
from tests.helpers.tiny_models import TINY_CONFIGS, TOKENIZER, save_tiny_llama

# Every field of MFTCoder's MftTrainArgs (mftcoder_accelerate/src/pefts/mft_arguments.py, 8ba13f4) with
# its default; the five without one get tiny-run values here.
MFTCODER_DEFAULTS = {
    "data_paths": DATA, "output_dir": "out", "tb_dir": "out/tb", "pretrained_model_path": None,
    "model_type": "llama", "load_raw_dataset": True, "task_weights": None, "data_weights": None,
    "low_cpu_mem_usage": True, "data_split": "98,2,0", "padding_mode": "padding", "tokenize_mode": "sft",
    "weighted_loss_mode": "case3", "peft_type": "qlora", "quantization": "4bit", "lora_rank": 96,
    "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": None, "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8, "tokenizer_type": "AutoTokenizer", "learning_rate": 5e-5, "min_lr": 5e-6,
    "weight_decay": 0.01, "gradient_accumulation_steps": 1, "lr_scheduler_type": "cosine",
    "num_warmup_steps": 0.05, "num_train_epochs": 4, "seed": 1234, "seq_length": 4096,
    "resume_from_checkpoint": None, "auto_resume": True, "log_interval": 10, "checkpointing_steps": 100,
    "evaluation_steps": 100, "max_train_steps": None, "epoch_checkpointing": False,
    "shuffle_before_split": True, "use_random_sampler": True, "early_stopping": True,
    "early_stopping_stall_num": 5, "saving_limit": None, "use_dynamic_padding": True, "coba_warmup_steps": 100,
    "coba_history_length": 200, "coba_tau": 5, "coba_update_interval": 1, "coba_sample_valid_num": 1,
    "attn_implementation": "flash_attention_2", "role_markers": None, "distributed_type": None,
    "init_timeout_seconds": 3600, "use_xformers": True, "trust_remote_code": True,
    "weight_by_num_documents": True, "make_vocab_size_divisible_by": 32, "model_parallel_size": 1,
    "use_slow_tokenizer": False, "world_size": 8,
}
# MFTCoder's defaults peft_type "qlora" / quantization "4bit" adapt a pretrained model; TINY builds one.
NEEDS_PRETRAINED = {"peft_type", "quantization"}
TINY = {"tokenizer_path": TOKENIZER, "model_config": TINY_CONFIGS["llama"]}


def test_every_other_mftcoder_key_loads_with_its_default():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(MFTCODER_DEFAULTS) - fields == set(mftcoder.LEGACY)  # read, checked, then dropped
    cfg = TrainConfig.from_dict({k: v for k, v in MFTCODER_DEFAULTS.items() if k not in NEEDS_PRETRAINED} | TINY)
    assert cfg.trust_remote_code is True and not set(mftcoder.LEGACY) & set(cfg.to_dict())
    # MFTCoder's default backend: resolved when the model is built, to mftcore_varlen without flash_attn.
    assert cfg.attn_implementation == "flash_attention_2"
    with pytest.warns(UserWarning, match="flash_attn is not installed"):
        assert resolve_attn_implementation(cfg.attn_implementation, cfg.padding_mode) == "mftcore_varlen"


@pytest.mark.parametrize("key, value, message", [
    ("tokenizer_type", "LlamaTokenizer", "only \"AutoTokenizer\""),
    ("use_dynamic_padding", False, "pad every batch to seq_length"),
    ("data_weights", "[1.,2.]", "2 weights for 3 data_paths"),
    ("model_parallel_size", 2, "only 1"),
    ("model_type", "baichuan", "MFTCoder runs it from model code"),
    ("init_timeout_seconds", 0, "positive integer"),
    ("lr_scheduler_type", "inverse_sqrt", "not supported"),
    ("tokenize_mode", "sst", "not supported"),
])
def test_unsupported_values_are_one_line_errors_naming_the_key(key, value, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"data_paths": DATA, **TINY, key: value})
    assert f"{key}:" in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_data_weights_as_mftcoder_writes_them_are_sampling_proportions():
    """MFTCoder's "[1.,1.,1.]" string is read as a list; mftcore samples the tasks in these proportions
    (mftcore/data/sampling.py), where MFTCoder ignores them."""
    cfg = TrainConfig.from_dict({"data_paths": DATA, **TINY, "data_weights": "[1.,2.,1.]"})
    assert cfg.data_weights == [1.0, 2.0, 1.0]


def test_mftcoder_flags_become_overrides():
    args = build_parser().parse_args([
        "train", "--train_config", "c.json", "--data_paths", "[a,b]", "--output_dir", "123", "--tb_dir", "tb",
        "--pretrained_model_path", "m", "--micro_batch_size", "4", "--model_type", "qwen2",
        "--distributed_type", "fsdp", "seed=7"])
    path, overrides = train_config_and_overrides(args)
    assert path == "c.json"
    assert overrides == ['data_paths="[a,b]"', 'output_dir="123"', 'tb_dir="tb"', 'pretrained_model_path="m"',
                         "per_device_train_batch_size=4", "per_device_eval_batch_size=4", 'model_type="qwen2"',
                         'distributed_type="fsdp"', "seed=7"]
    path, overrides = train_config_and_overrides(build_parser().parse_args(["train", "c.json", "seed=7"]))
    assert (path, overrides) == ("c.json", ["seed=7"])
    with pytest.raises(ConfigError, match="give a config file"):
        train_config_and_overrides(build_parser().parse_args(["train", "seed=7"]))


def test_train_with_mftcoder_flags_end_to_end(tmp_path, tokenizer):
    """MFTCoder's launch line: the config's paths replaced by flags, a tiny pretrained model."""
    model = save_tiny_llama(str(tmp_path / "model"), tokenizer)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"data_paths": "$DATA_PATHS", "output_dir": "$OUTPUT_DIR", "model_type": "$MODEL_TYPE",
                                  "pretrained_model_path": "$MODEL", "seq_length": 256, "max_train_steps": 3,
                                  "evaluation_steps": 0, "checkpointing_steps": 0, "learning_rate": 1e-3,
                                  "min_lr": 1e-4, "num_warmup_steps": 1}))
    out, tb = tmp_path / "out", tmp_path / "tb"
    assert main(["train", "--train_config", str(config), "--data_paths", f"[{DATA[0]},{DATA[2]}]",
                 "--output_dir", str(out), "--tb_dir", str(tb), "--pretrained_model_path", model,
                 "--micro_batch_size", "3", "--model_type", "llama", "log_interval=1",
                 'role_markers={"user": "### Q:\\n"}']) == 0
    with open(out / "final" / "mftcore_config.json") as f:
        saved = json.load(f)
    assert saved["data_paths"] == [DATA[0], DATA[2]] and saved["pretrained_model_path"] == model
    assert saved["per_device_train_batch_size"] == saved["per_device_eval_batch_size"] == 3
    assert saved["log_interval"] == 1 and os.listdir(tb)
    # The trained model's tokenizer renders the training prompt with the run's role markers.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "final")
    messages = [{"role": "user", "content": "q"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "### Q:\nq\n<s>bot\n"


def test_epoch_checkpointing_saves_at_each_epoch_end(tmp_path, tiny_config):
    task = tmp_path / "task"
    task.mkdir()
    line = {"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}]}
    (task / "d.jsonl").write_text((json.dumps(line) + "\n") * 20)
    common = dict(data_paths=[str(task)], data_split="100,0,0", per_device_train_batch_size=8, max_train_steps=None,
                  num_train_epochs=2, checkpointing_steps=0, model_config=TINY_CONFIGS["llama"])
    for flag, expected in ((True, ["checkpoint-3", "checkpoint-6"]), (False, ["checkpoint-6"])):
        out = tmp_path / f"out-{flag}"
        path, _ = tiny_config(output_dir=str(out), epoch_checkpointing=flag, **common)
        assert main(["train", path]) == 0
        assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == expected


def test_linear_and_constant_with_warmup_schedules():
    import torch

    from mftcore.optim import build_scheduler

    lrs = {}
    for kind in ("linear", "constant_with_warmup"):
        cfg = TrainConfig.from_dict({"data_paths": DATA, **TINY, "learning_rate": 1.0, "min_lr": 0.1,
                                     "num_warmup_steps": 2, "lr_scheduler_type": kind})
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_scheduler(opt, cfg, total_steps=6)
        lrs[kind] = []
        for _ in range(7):
            lrs[kind].append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
    assert lrs["linear"] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.775, 0.55, 0.325, 0.1])
    assert lrs["constant_with_warmup"] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.json"))), ids=os.path.basename)
def test_shipped_configs_load(path):
    with open(path) as f:
        raw = json.load(f)
    if "zero_optimization" in raw:  # a DeepSpeed config, referenced by deepspeed_config
        assert raw["zero_optimization"]["stage"] in (2, 3)
        return
    TrainConfig.from_dict(raw, source=path)


# MFTCoder's four shipped train configs (mftcoder_accelerate/src/configs/*_train_config.json, 8ba13f4),
# key for key; only the $PLACEHOLDERS are filled in by the test, as a user fills them in.
MFTCODER_COMMON = {
    "data_paths": "$DATA_PATHS", "output_dir": "$OUTPUT_DIR", "tb_dir": "$TensorBoard_DIR",
    "pretrained_model_path": "$MODEL_NAME_OR_PATH", "model_type": "$MODEL_TYPE", "load_raw_dataset": True,
    "data_split": "98,2,0", "padding_mode": "padding", "use_dynamic_padding": True, "tokenize_mode": "sft",
    "tokenizer_type": "AutoTokenizer", "weighted_loss_mode": "case3", "attn_implementation": "flash_attention_2",
    "seq_length": 4096, "seed": 1234, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
    "learning_rate": 5e-5, "min_lr": 5e-6, "weight_decay": 0.1, "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine", "num_warmup_steps": 300, "num_train_epochs": 4, "resume_from_checkpoint": None,
    "log_interval": 10, "checkpointing_steps": 100, "evaluation_steps": 100, "max_train_steps": None,
    "epoch_checkpointing": True, "shuffle_before_split": True, "early_stopping": True,
    "early_stopping_stall_num": 5, "saving_limit": None,
}
LORA = {"lora_rank": 96, "lora_alpha": 32, "lora_dropout": 0.05}
MFTCODER_CONFIGS = {
    "full": {**MFTCODER_COMMON, "peft_type": None, "saving_limit": 3},
    "lora": {**MFTCODER_COMMON, "peft_type": "lora", "quantization": None, **LORA},
    "qlora": {**MFTCODER_COMMON, "peft_type": "qlora", "quantization": "4bit", **LORA},
    "coba": {**MFTCODER_COMMON, "data_split": "95,5,0", "weighted_loss_mode": "coba", "coba_warmup_steps": 100,
             "coba_history_length": 200, "coba_tau": 5, "coba_update_interval": 1, "coba_sample_valid_num": 1,
             "peft_type": "qlora", "quantization": "4bit", **LORA, "per_device_train_batch_size": 8,
             "per_device_eval_batch_size": 8},
}


@pytest.mark.parametrize("name", sorted(MFTCODER_CONFIGS))
def test_mftcoder_train_configs_run_unchanged(name, tmp_path, tokenizer):
    """Each of MFTCoder's configs trains as MFTCoder launches it (--train_config plus its flags), cut to two
    steps by one override; flash_attention_2 runs on mftcore_varlen where flash_attn is missing."""
    base = save_tiny_llama(str(tmp_path / "base"), tokenizer)
    values = {"$DATA_PATHS": "[" + ",".join(DATA) + "]", "$OUTPUT_DIR": str(tmp_path / "out"),
              "$TensorBoard_DIR": str(tmp_path / "tb"), "$MODEL_NAME_OR_PATH": base, "$MODEL_TYPE": "llama"}
    raw = {k: values.get(v, v) if isinstance(v, str) else v for k, v in MFTCODER_CONFIGS[name].items()}
    path = tmp_path / f"{name}_train_config.json"
    path.write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="flash_attn is not installed"):
        assert main(["train", "--train_config", str(path), "max_train_steps=2"]) == 0
    final = tmp_path / "out" / "final"
    weights = "model.safetensors" if name == "full" else "adapter_model.safetensors"
    assert (final / weights).is_file() and (tmp_path / "tb").is_dir()
