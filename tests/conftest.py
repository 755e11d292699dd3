import json
import os

import pytest
import torch

# Tiny models: intra-op threads cost more than they give. The 6-step CoBa resume run of
# test_resume.py took 6.2 s CPU / 12.3 s wall with torch's default 2 threads on the shared 2-core
# machine, 0.6 s / 1.2 s with one.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "examples", "tokenizer")
DATA = [os.path.join(ROOT, "examples", "data", t) for t in ("python_funcs", "sql_queries", "shell_commands")]

TINY_MODEL = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture
def tiny_config(tmp_path):
    """Write a small training config under tmp_path; returns (path, dict). Pass updates as kwargs."""

    def make(**updates):
        cfg = {
            "data_paths": DATA, "output_dir": str(tmp_path / "out"), "tokenizer_path": TOKENIZER,
            "model_config": TINY_MODEL, "seq_length": 256, "data_split": "95,5,0",
            "per_device_train_batch_size": 8, "learning_rate": 3e-3, "min_lr": 3e-4,
            "num_warmup_steps": 5, "log_interval": 5, "evaluation_steps": 0, "checkpointing_steps": 0,
            "max_train_steps": 10,
        }
        cfg.update(updates)
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(cfg))
        return str(path), cfg

    return make
