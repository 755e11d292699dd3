"""The suite's pytest fixtures (registered by tests/conftest.py): the sample tokenizer, a tiny training
config written under tmp_path, and a tiny pretrained model on disk."""

import atexit
import json
import os
import shutil
import tempfile

import pytest

from tests.helpers.paths import DATA, TINY_MODEL, TOKENIZER

# No test reaches a hub: the Hugging Face caches live in a directory of this session, offline (datasets and
# huggingface_hub read these when first imported, so they are set when pytest loads this plugin).
HF_HOME = tempfile.mkdtemp(prefix="mftcore-tests-hf-")
atexit.register(shutil.rmtree, HF_HOME, True)
os.environ.update(HF_HOME=HF_HOME, HF_HUB_CACHE=os.path.join(HF_HOME, "hub"),
                  HF_DATASETS_CACHE=os.path.join(HF_HOME, "datasets"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


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


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """A randomly initialised tiny Llama with the sample tokenizer, saved as an HF directory."""
    from tests.helpers.engine import save_tiny_pretrained

    return save_tiny_pretrained(tmp_path_factory.mktemp("pretrained"))
