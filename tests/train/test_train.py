"""End to end: a short training run on the shipped sample data, its outputs, reload and generate."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mftcore.config import TrainConfig
from mftcore.data import collate_padded, load_tasks
from mftcore.model.load import load_tokenizer
from mftcore.model.loss_model import batch_loss
from mftcore.optim import build_scheduler
from mftcore.train import train


def run_tiny(tiny_config, **updates):
    path, _ = tiny_config(**updates)
    cfg = TrainConfig.from_file(path)
    return cfg, train(cfg)


def read_metrics(cfg):
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_short_run_halves_the_loss_and_saves_everything(tiny_config):
    cfg, final = run_tiny(tiny_config, max_train_steps=100, log_interval=1, evaluation_steps=50,
                          checkpointing_steps=50)
    records = read_metrics(cfg)
    train_recs = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 101))
    assert train_recs[-1]["loss"] <= 0.5 * train_recs[0]["loss"], (train_recs[0]["loss"], train_recs[-1]["loss"])
    assert set(train_recs[0]["task_loss"]) <= {"python_funcs", "sql_queries", "shell_commands"}
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(train_recs[0])
    assert [r["step"] for r in records if r["split"] == "valid"] == [50, 100]

    out = cfg.output_dir
    assert sorted(os.listdir(out)) == [".mftcore.lock", "checkpoint-100", "checkpoint-50", "final", "memory.json",
                                       "metrics.jsonl", "report.html", "run.json", "tensorboard"]  # the lock file stays: removing it would race a waiting run
    assert os.listdir(os.path.join(out, "tensorboard"))
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        assert os.path.isfile(os.path.join(out, "checkpoint-100", name))
    assert {"model.safetensors", "config.json", "tokenizer.json", "mftcore_config.json"} <= set(os.listdir(final))

    # Reload: the final model in plain transformers scores the validation data exactly as logged.
    model = AutoModelForCausalLM.from_pretrained(final, use_safetensors=True)
    tokenizer = load_tokenizer(cfg)
    data = load_tasks(cfg, tokenizer, tokenizer.eos_token_id)
    batch = collate_padded(data.valid, tokenizer.eos_token_id)
    with torch.no_grad():
        got = batch_loss(model, batch, 3, reduction="task_mean").loss.item()
    assert got == pytest.approx(records[-1]["loss"], rel=1e-4)

    proc = subprocess.run([sys.executable, "-m", "mftcore", "generate", "--model", final, "--prompt",
                           "How do I count the lines in app.log?", "--max_new_tokens", "8"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "generate printed no text"


def test_gradient_accumulation_matches_one_big_batch(tiny_config):
    """Normalising over the whole step: 2 micro-batches of 4 give the same run as 1 of 8."""
    base = dict(max_train_steps=3, log_interval=1, learning_rate=1e-3)
    cfg_a, _ = run_tiny(tiny_config, per_device_train_batch_size=8, **base)
    loss_a = [r["loss"] for r in read_metrics(cfg_a)]
    cfg_b, _ = run_tiny(tiny_config, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                        output_dir=cfg_a.output_dir + "-ga", **base)
    loss_b = [r["loss"] for r in read_metrics(cfg_b)]
    assert loss_b == pytest.approx(loss_a, rel=1e-4)


def test_schedule_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig.from_dict({"data_paths": ["a"], "tokenizer_path": "t", "model_config": {"model_type": "llama"},
                                 "learning_rate": 1.0, "min_lr": 0.1, "num_warmup_steps": 4})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    lrs.append(sched.get_last_lr()[0])
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55) and lrs[14] == pytest.approx(0.1)


def test_train_packs_and_reuses_the_cache(tiny_config, capsys):
    """`mftcore prepare` then `train` with padding_mode "pack": the cache is reused, the run learns."""
    import json
    import os

    from mftcore.cli import main

    path, cfg = tiny_config(padding_mode="pack", seq_length=128, per_device_train_batch_size=2,
                            max_train_steps=6, log_interval=1, evaluation_steps=6)
    assert main(["prepare", path]) == 0
    assert "(built)" in capsys.readouterr().err
    assert main(["train", path]) == 0
    out = capsys.readouterr()
    assert "(reused)" in out.out + out.err
    with open(os.path.join(cfg["output_dir"], "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train) == 6 and all(np.isfinite(train)) and train[-1] < train[0]
    assert [r["step"] for r in records if r["split"] == "valid"] == [6]
