"""Checkpoints and the final model, written to a temporary directory and renamed when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid

import torch


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary sibling directory; on success it replaces `path`, on error it is removed."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = os.path.join(parent, f".old-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, state: dict) -> str:
    """checkpoint-{step}/: the model (HF safetensors), optimizer, scheduler and trainer state as JSON."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump({"step": step, **state}, f, indent=2)
    return path


def save_final(output_dir: str, model, tokenizer, config: dict) -> str:
    """final/: an HF model directory (safetensors) with the tokenizer and the training config, so that
    `mftcore generate` knows the role markers it was trained with."""
    path = os.path.join(output_dir, "final")
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "mftcore_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    return path
