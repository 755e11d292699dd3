"""Kernel tuning in a distributed run (mftcore/parallel/tuning.py): rank 0 measures, both ranks use its choices."""

import json
import os
import subprocess
import sys

import torch

import mftcore.model.attention  # noqa: F401 - registers attn_implementation="mftcore_varlen"
from mftcore.parallel.tuning import run_shapes, share_kernel_tuning
from tests.helpers.paths import ROOT


def test_rank_zero_measures_and_every_rank_uses_its_choices(tmp_path):
    env = dict(os.environ, MFTCORE_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(ROOT, "tests", "helpers", "tuning_ranks.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = {r["rank"]: r for r in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    assert ranks[0]["timed"] == [64, 128, 256] and ranks[1]["timed"] == []  # only rank 0 measured
    for r in ranks.values():  # rank 0's choice everywhere, and for a key nobody tuned, the nearest one's
        assert r["shared"] == 1 and r["exact"] == 128 and r["near"] == 128


def test_a_single_process_shares_nothing():
    assert share_kernel_tuning(None, None, tune=lambda *a: (_ for _ in ()).throw(AssertionError("tuned"))) == 0


def test_run_shapes_reads_the_model(tiny_pretrained):
    from transformers import AutoModelForCausalLM

    from mftcore.config import TrainConfig
    from tests.helpers.paths import DATA

    lm = AutoModelForCausalLM.from_pretrained(tiny_pretrained, attn_implementation="mftcore_varlen")
    cfg = TrainConfig(data_paths=DATA, seq_length=256, per_device_train_batch_size=4, per_device_eval_batch_size=2,
                      pretrained_model_path=tiny_pretrained)
    s = run_shapes(cfg, lm, torch.bfloat16)
    assert (s.train_tokens, s.eval_tokens, s.hidden, s.vocab, s.bias) == (1024, 512, 128, lm.config.vocab_size, False)
    assert (s.varlen, s.heads, s.kv_heads, s.head_dim, s.dtype) == (True, 4, 2, 32, torch.bfloat16)
