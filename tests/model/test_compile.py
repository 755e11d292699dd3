"""torch_compile: each decoder layer and the loss compiled (mftcore/model/compile.py), on the CPU with inductor."""

import json
import os

import pytest
import torch

from mftcore.config import TrainConfig
from mftcore.model.compile import compile_layers, decoder_layers
from mftcore.train import train


def train_losses(tiny_config, out, **updates):
    path, _ = tiny_config(output_dir=str(out), max_train_steps=5, log_interval=1, num_warmup_steps=1, **updates)
    cfg = TrainConfig.from_file(path)
    train(cfg)
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_compiled_training_gives_the_eager_losses(tiny_config, tmp_path):
    """5 steps on packed rows (mftcore_varlen attention, the fused loss, activation checkpointing), compiled
    and eager: the same losses to 1e-5."""
    torch._dynamo.reset()
    common = dict(padding_mode="pack", attn_implementation=None, gradient_checkpointing=True)
    eager = train_losses(tiny_config, tmp_path / "eager", **common)
    compiled = train_losses(tiny_config, tmp_path / "compiled", torch_compile=True, **common)
    assert len(eager) == len(compiled) == 5
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-5)
    assert eager[-1] < eager[0]


def test_compile_layers_compiles_in_place_and_keeps_state_dict_keys(tiny_pretrained):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pretrained)
    keys = list(model.state_dict())
    assert compile_layers(model) == len(decoder_layers(model)) == 2
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    assert list(model.state_dict()) == keys


def test_a_model_without_decoder_layers_is_named():
    class Body(torch.nn.Module):
        pass

    class Model(torch.nn.Module):
        base_model_prefix = "model"

        def __init__(self):
            super().__init__()
            self.model = Body()

    with pytest.raises(ValueError, match="torch_compile: no list of decoder layers found in Body"):
        decoder_layers(Model())
