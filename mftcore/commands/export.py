"""`mftcore export CHECKPOINT OUT`: one HF model (or PEFT adapter) directory from a checkpoint of any
engine, in this one process. The model is rebuilt from the checkpoint's mftcore_config.json (so its
pretrained_model_path and tokenizer_path must resolve from here), then the engine that wrote the
checkpoint reads its weights into it."""

from __future__ import annotations

import os

import torch

from mftcore.checkpoint import read_state, save_model_dir
from mftcore.config import TrainConfig
from mftcore.errors import ConfigError
from mftcore.io import CONFIG_FILE, STATE_FILE
from mftcore.model.build import build_model
from mftcore.model.chat_template import set_training_template
from mftcore.model.load import load_tokenizer
from mftcore.parallel import engine_of_format


def export_checkpoint(path: str, out: str) -> str:
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ConfigError(f"export: {path}: not a checkpoint directory (no {STATE_FILE})")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise ConfigError(f"export: {path}: no {CONFIG_FILE} (saved by an older mftcore); its weights are in place")
    cfg = TrainConfig.from_file(os.path.join(path, CONFIG_FILE))
    tokenizer = load_tokenizer(cfg)
    set_training_template(tokenizer, cfg.chat_template, cfg.role_markers)
    model = build_model(cfg, len(tokenizer), torch.device("cpu"))
    fmt = read_state(path).get("format", "hf")
    try:
        engine = engine_of_format(fmt)
    except KeyError:
        raise ConfigError(f"export: {path}: unknown checkpoint format {fmt!r} in {STATE_FILE}") from None
    engine.load_weights(path, model, cfg.peft_type is not None)
    return save_model_dir(out, model, tokenizer, cfg.to_dict())
