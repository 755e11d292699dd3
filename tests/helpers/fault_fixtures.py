"""Fixtures of the fault-injection suite (tests/faults/), registered by tests/conftest.py: one short
training run whose checkpoints the resume, overlap and trust cases copy and damage."""

import shutil

import pytest

from tests.helpers.paths import DATA, TOKENIZER


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """3 steps, a checkpoint after each, on copies of the sample data and tokenizer (so that a guard
    that failed could only destroy copies): {"root", "config" (dict), "config_path", "output_dir"}."""
    from mftcore.cli import main
    from tests.faults.harness import base_config, write_json

    root = tmp_path_factory.mktemp("trained-run")
    data = [str(shutil.copytree(d, root / "data" / d.rsplit("/", 1)[-1])) for d in DATA]
    tokenizer = str(shutil.copytree(TOKENIZER, root / "tokenizer"))
    cfg = base_config(root, data_paths=data, tokenizer_path=tokenizer, max_train_steps=3, checkpointing_steps=1)
    path = write_json(root / "c.json", cfg)
    assert main(["train", path]) == 0
    return {"root": root, "config": cfg, "config_path": path, "output_dir": cfg["output_dir"]}
