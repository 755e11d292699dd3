"""LoRA keeps no more for the backward than full fine-tuning (bytes counted by saved_tensors_hooks, so
deterministic), its adapters compute what peft's do, and train writes memory.json after step 1."""

import json
import os
import types

import pytest
import torch

from mftcore.config import TrainConfig
from mftcore.data.batch import collate_packed
from mftcore.memory import SavedBytes, fix_host_malloc, memory_breakdown
from mftcore.model.build import build_model
from mftcore.model.loss_model import LossModel
from tests.helpers.paths import DATA, TOKENIZER


def packed_batch():
    g = torch.Generator().manual_seed(0)
    rows = [[types.SimpleNamespace(input_ids=torch.randint(0, 500, (60 + 3 * d,), generator=g).tolist(),
                                   loss_mask=[0] * 10 + [1] * (50 + 3 * d), task_id=d) for d in range(2)]
            for _ in range(2)]
    return collate_packed(rows, 0)


def model_for(pretrained, **kw):
    cfg = TrainConfig.from_dict({"data_paths": DATA, "output_dir": "unused", "tokenizer_path": TOKENIZER,
                                 "pretrained_model_path": pretrained, "padding_mode": "pack",
                                 "gradient_checkpointing": False, **kw})
    torch.manual_seed(0)
    return LossModel(build_model(cfg, None, torch.device("cpu")), 3)


def saved_for_backward(model) -> int:
    with SavedBytes(model) as saved:
        out = model(packed_batch(), reduction="sum")
    out.loss.backward()
    return saved.bytes


def test_lora_saves_no_more_for_backward_than_full_fine_tuning(tiny_pretrained):
    full = saved_for_backward(model_for(tiny_pretrained))
    lora = saved_for_backward(model_for(tiny_pretrained, peft_type="lora", lora_dropout=0.05))
    # peft's own path kept a dropped copy of each adapted linear's input and the rank-r intermediate:
    # 8.4 MB against full fine-tuning's 5.95 MB on this model.
    assert lora <= full, (lora, full)


def peft_delta(layer, x):
    """What peft computes for the adapter (the same dropout mask is not reproducible: p=0 here)."""
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    return b(a(x)) * layer.scaling["default"]


def test_low_memory_adapter_matches_peft_and_its_gradients(tiny_pretrained):
    from peft.tuners.lora.layer import Linear

    model = model_for(tiny_pretrained, peft_type="lora", lora_dropout=0.0)
    layer = next(m for m in model.modules() if type(m) is Linear)
    for p in layer.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # lora_B starts at zero: make the test able to see it
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64, requires_grad=True)
    layer.double()
    ours = layer(x)
    theirs = layer.base_layer(x) + peft_delta(layer, x)
    torch.testing.assert_close(ours, theirs)
    g = torch.randn_like(ours)
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    mine = torch.autograd.grad(ours, params, g)
    ref = torch.autograd.grad(theirs, params, g)
    for m, r in zip(mine, ref):
        torch.testing.assert_close(m, r)


def test_dropout_mask_is_the_same_in_backward_and_scaled():
    from mftcore.model.lora import LoraDelta

    x = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, a, b: LoraDelta.apply(x, a, b, 0.5, 0.25, 1234), (x, a, b))
    from mftcore.model.lora import drop
    kept = drop(torch.ones(10000, dtype=torch.float64), 0.25, 7)
    assert set(kept.unique().tolist()) <= {0.0, 1 / 0.75}
    assert 0.7 < (kept > 0).double().mean() < 0.8


def test_memory_breakdown_counts_tensors(tiny_pretrained):
    model = model_for(tiny_pretrained)
    opt = torch.optim.AdamW(model.parameters())
    saved = saved_for_backward(model)
    opt.step()
    rec = memory_breakdown(model, opt, torch.device("cpu"), saved_bytes=saved)
    weights = sum(p.numel() * 4 for p in model.parameters()) / 2**30
    assert rec["weights_gb"] == pytest.approx(weights) and rec["gradients_gb"] == pytest.approx(weights)
    assert rec["optimizer_state_gb"] == pytest.approx(2 * weights)  # Adam's two moments
    assert rec["activations_gb"] == saved / 2**30 > 0
    assert rec["peak_gb"] > 0 and rec["device"] == "cpu" and "saved_tensors_hooks" in rec["method"]


def test_train_writes_memory_json_after_step_one(tiny_config, tmp_path):
    from mftcore.train import train

    path, cfg = tiny_config(max_train_steps=2, log_interval=1)
    train(TrainConfig.from_file(path))
    rec = json.load(open(os.path.join(cfg["output_dir"], "memory.json")))
    assert set(rec) == {"weights_gb", "gradients_gb", "optimizer_state_gb", "activations_gb", "peak_gb", "device",
                        "method"}
    assert rec["weights_gb"] > 0 and rec["optimizer_state_gb"] > 0 and rec["activations_gb"] > 0


def test_host_malloc_threshold_is_fixed_unless_the_user_set_one(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_host_malloc() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert fix_host_malloc() is True  # glibc on the CI machine
