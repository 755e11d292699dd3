"""Kernel tuning in a distributed run (mftcore/parallel/tuning.py): rank 0 measures, both ranks use its choices."""

import json
import os
import subprocess
import sys

import pytest
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


OPTION_KEYS = ("label_smoothing", "z_loss", "softcap", "logit_scale")
WINDOWED_QWEN2 = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=4, use_sliding_window=True,
                      max_window_layers=1)  # layer 0 full, layers 1-2 slide


@pytest.mark.parametrize("family", ["gemma2", "cohere", "qwen2"])
def test_rank_zero_tunes_the_options_a_step_meets(family, monkeypatch):
    """What tune_shapes runs (the keys rank 0 shares) has the options a real training step of the model passes
    to each op: the head's softcap / logit_scale, and each layer's (window, softcap)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import mftcore.model.attention as attention
    from mftcore.config import TrainConfig
    from mftcore.data import Sample, collate_packed
    from mftcore.kernels import fused_linear_cross_entropy, varlen_attention
    from mftcore.model.loss_model import batch_loss
    from mftcore.parallel import tuning
    from tests.helpers.paths import DATA
    from tests.helpers.tiny_models import TINY_CONFIGS

    spec = dict(WINDOWED_QWEN2 if family == "qwen2" else TINY_CONFIGS[family])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=64, **spec)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="mftcore_varlen")
    seen = {"loss": set(), "attention": set()}

    def loss(*args, **kwargs):
        seen["loss"].add(tuple(sorted((k, kwargs[k]) for k in OPTION_KEYS if k in kwargs)))
        return fused_linear_cross_entropy(*args, **kwargs)

    def attend(*args, window_size=(-1, -1), softcap=0.0, **kwargs):
        seen["attention"].add((tuple(window_size), float(softcap)))
        return varlen_attention(*args, window_size=window_size, softcap=softcap, **kwargs)

    monkeypatch.setattr(attention, "varlen_attention", attend)
    docs = [Sample(list(range(1, n + 1)), [0] + [1] * (n - 1), 0) for n in (9, 3, 12)]
    batch_loss(lm, collate_packed([docs], pad_id=0), 1, loss).loss.backward()
    step = dict(seen)
    assert step["loss"] and step["attention"]
    if family == "gemma2":  # the options bind: the test would see a plain tuner miss them
        assert step["loss"] == {(("softcap", 0.5),)} and {s for _, s in step["attention"]} == {50.0}
    if family == "qwen2":
        assert step["attention"] == {((-1, -1), 0.0), ((3, 3), 0.0)}

    seen = {"loss": set(), "attention": set()}
    monkeypatch.setattr(tuning, "interpreted", lambda: True)  # tune on CPU (the references): record the calls
    monkeypatch.setattr(tuning, "fused_linear_cross_entropy", loss)
    monkeypatch.setattr(tuning, "varlen_attention", attend)
    cfg = TrainConfig(data_paths=DATA, seq_length=16, per_device_train_batch_size=1, per_device_eval_batch_size=1,
                      pretrained_model_path="unused")
    tuning.tune_shapes(tuning.run_shapes(cfg, lm, torch.float32), torch.device("cpu"))
    assert seen == step
