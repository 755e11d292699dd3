"""`mftcore export CHECKPOINT OUT`: one HF model (or PEFT adapter) directory from a checkpoint of any
engine, in this one process. The model is rebuilt from the checkpoint's mftcore_config.json (so its
pretrained_model_path and tokenizer_path must resolve from here), then the engine that wrote the
checkpoint reads its weights into it.

A checkpoint may come from someone else, so nothing in it decides what runs here: its saved config's
trust_remote_code is replaced by the command line's --trust_remote_code, its format is read off its
files (a `format` in trainer_state.json that they contradict is refused), and the whole checkpoint is
checked (mftcore/checkpoint.py: checkpoint_problem) before anything is loaded. OUT may not be, contain
or lie inside the checkpoint, its run directory or the model's inputs (mftcore/outputs.py)."""

from __future__ import annotations

import os
import sys

import torch

from mftcore.checkpoint import checkpoint_problem, format_of, read_state, save_model_dir
from mftcore.config import TrainConfig
from mftcore.errors import ConfigError
from mftcore.integrity import CheckpointError
from mftcore.io import CONFIG_FILE, STATE_FILE
from mftcore.model.build import build_model
from mftcore.model.chat_template import set_training_template
from mftcore.model.load import check_vocabulary, load_tokenizer
from mftcore.outputs import check_output, is_model_dir


def export_inputs(path: str, cfg: TrainConfig) -> dict:
    inputs = {"checkpoint": path, "training run directory": os.path.dirname(os.path.abspath(path)),
              "pretrained_model_path": cfg.pretrained_model_path, "tokenizer_path": cfg.tokenizer_path}
    inputs.update({f"data path {i + 1}": p for i, p in enumerate(cfg.data_paths or [])})
    return inputs


def export_checkpoint(path: str, out: str, trust_remote_code: bool = False) -> str:
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ConfigError(f"export: {path}: not a checkpoint directory (no {STATE_FILE})")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise ConfigError(f"export: {path}: no {CONFIG_FILE} (saved by an older mftcore); its weights are in place")
    cfg = TrainConfig.from_file(os.path.join(path, CONFIG_FILE))  # read and checked; nothing of it runs yet
    check_output(out, "export", export_inputs(path, cfg), replaceable=is_model_dir)
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"export: {path}: damaged: {problem}")
    if cfg.trust_remote_code and not trust_remote_code:
        print(f"mftcore: note: {path}'s config sets trust_remote_code; ignored: only --trust_remote_code on this "
              "command line lets a model's own code run", file=sys.stderr)
    cfg.trust_remote_code = trust_remote_code
    engine, problem = format_of(path, read_state(path))
    if problem:  # checkpoint_problem said the same; kept for a checkpoint changed since
        raise CheckpointError(f"export: {path}: {problem}")
    tokenizer = load_tokenizer(cfg)
    set_training_template(tokenizer, cfg.chat_template, cfg.role_markers)
    model = build_model(cfg, len(tokenizer), torch.device("cpu"))
    check_vocabulary(model, tokenizer)
    engine.load_weights(path, model, cfg.peft_type is not None)
    return save_model_dir(out, model, tokenizer, cfg.to_dict())
