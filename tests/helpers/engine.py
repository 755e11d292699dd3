"""Shared by the training-engine tests: tiny configs, a tiny pretrained model on disk, output readers."""

import json
import os

import torch
from safetensors.torch import load_file

from mftcore.config import TrainConfig
from tests.helpers.paths import DATA, TINY_MODEL, TOKENIZER

BASE = {
    "data_paths": DATA, "tokenizer_path": TOKENIZER, "model_config": TINY_MODEL, "seq_length": 256,
    "data_split": "98,2,0", "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
    "learning_rate": 3e-3, "min_lr": 3e-4, "num_warmup_steps": 2, "log_interval": 1, "evaluation_steps": 0,
    "checkpointing_steps": 0, "max_train_steps": 4,
}


def engine_config(output_dir, **updates) -> TrainConfig:
    return TrainConfig.from_dict({**BASE, "output_dir": str(output_dir), **updates})


def write_config(path, output_dir, **updates) -> str:
    with open(path, "w") as f:
        json.dump({**BASE, "output_dir": str(output_dir), **updates}, f)
    return str(path)


def save_tiny_pretrained(path, **config_updates) -> str:
    """A randomly initialised tiny Llama with the sample tokenizer, saved as an HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    spec = {**TINY_MODEL, **config_updates}
    model_type = spec.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=len(tok), **spec))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def read_metrics(output_dir, split=None) -> list:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if split is None or r["split"] == split]


def tensors(directory, name="model.safetensors") -> dict:
    return load_file(os.path.join(directory, name))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max().item()})"


class InfGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose update must be skipped."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")
