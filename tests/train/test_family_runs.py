"""End to end for the logit-transform families: a short `mftcore train` of a tiny Gemma2 (final-logit and
attention softcap, sliding windows) and Cohere (logit_scale), packed on mftcore_varlen, through the real
trainer (and Gemma2 packed on eager, and padded on the default backend); final/ scores the validation data as logged and `mftcore generate` answers from it."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from mftcore.cli import main
from mftcore.config import TrainConfig
from mftcore.data import collate_padded, load_tasks
from mftcore.model.load import load_tokenizer
from mftcore.model.loss_model import batch_loss
from tests.helpers.tiny_models import TINY_CONFIGS


CASES = [("gemma2", "pack", "mftcore_varlen"), ("cohere", "pack", "mftcore_varlen"),
         ("gemma2", "pack", "eager"),  # packed on eager: the block-diagonal masks carry the windows
         ("gemma2", "padding", None)]  # the default backend for padded rows: eager (transformers has no sdpa)


@pytest.mark.parametrize("family, padding, attn", CASES, ids=[f"{f}-{p}-{a}" for f, p, a in CASES])
def test_short_run_trains_saves_and_generates(family, padding, attn, tiny_config):
    model_config = dict(TINY_CONFIGS[family])
    if family == "gemma2":
        model_config["sliding_window"] = 4  # shorter than the documents: the window binds
    path, raw = tiny_config(model_type=family, model_config=model_config, padding_mode=padding,
                            attn_implementation=attn, seq_length=64, per_device_train_batch_size=2,
                            max_train_steps=3, log_interval=1, evaluation_steps=3)
    assert main(["train", path]) == 0
    cfg = TrainConfig.from_file(path)
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_recs = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_recs)
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [3]

    final = os.path.join(cfg.output_dir, "final")
    with open(os.path.join(final, "config.json")) as f:
        assert json.load(f)["model_type"] == family
    # plain transformers (its own attention and logit transform) scores the validation data as logged
    model = AutoModelForCausalLM.from_pretrained(final, use_safetensors=True,
                                                 attn_implementation="eager" if family == "gemma2" else "sdpa")
    tokenizer = load_tokenizer(cfg)
    data = load_tasks(cfg, tokenizer, tokenizer.eos_token_id)
    with torch.no_grad():
        got = batch_loss(model, collate_padded(data.valid, tokenizer.eos_token_id), 3, reduction="task_mean")
    assert got.loss.item() == pytest.approx(valid[-1]["loss"], rel=1e-4)

    prompts, answers = os.path.join(cfg.output_dir, "prompts.jsonl"), os.path.join(cfg.output_dir, "answers.jsonl")
    with open(prompts, "w") as f:
        f.write(json.dumps({"prompt": "How do I count the lines in app.log?"}) + "\n")
        f.write(json.dumps({"prompt": "def add(a, b):"}) + "\n")
    assert main(["generate", "--model", final, "--file", prompts, "--output", answers, "--max_new_tokens", "4"]) == 0
    with open(answers) as f:
        outputs = [json.loads(line)["output"] for line in f]
    # a tiny model 3 steps in may answer whitespace (the data's commonest tokens), but it answers
    assert len(outputs) == 2 and all(isinstance(o, str) and o for o in outputs), outputs


def test_packed_gemma2_on_eager_trains_as_on_mftcore_varlen(tiny_config, tmp_path):
    """The same packed run (window 4, shorter than the documents) on eager's block-diagonal windowed masks and on
    the varlen kernel's windows: the same training losses step by step (the window is exact on both)."""
    losses = {}
    for attn in ("eager", "mftcore_varlen"):
        model_config = dict(TINY_CONFIGS["gemma2"], sliding_window=4)
        path, _ = tiny_config(model_type="gemma2", model_config=model_config, padding_mode="pack",
                              attn_implementation=attn, seq_length=64, per_device_train_batch_size=2,
                              max_train_steps=3, log_interval=1, output_dir=str(tmp_path / attn))
        assert main(["train", path]) == 0
        with open(os.path.join(tmp_path / attn, "metrics.jsonl")) as f:
            losses[attn] = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
    assert len(losses["eager"]) == 3
    assert losses["eager"] == pytest.approx(losses["mftcore_varlen"], rel=1e-4)
