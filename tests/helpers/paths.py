"""Paths and the tiny model every test shares: the repo root, the shipped tokenizer and sample data."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "examples", "tokenizer")
DATA = [os.path.join(ROOT, "examples", "data", t) for t in ("python_funcs", "sql_queries", "shell_commands")]

TINY_MODEL = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}
