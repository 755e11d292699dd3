"""Checkpoints and the final model, written to a temporary directory and renamed when complete.

checkpoint-{step}/ holds everything a run needs to continue exactly as if it had never stopped:
  model.safetensors + config.json      full fine-tuning (plain `from_pretrained` loads it), or
  adapter_model.safetensors + adapter_config.json   LoRA/QLoRA (plain `PeftModel.from_pretrained`)
  optimizer.pt, scheduler.pt, [scaler.pt]   torch state dicts (tensors and numbers only)
  rng_state_{rank}.pt                  python, numpy, torch CPU and CUDA generator states, one per rank
  trainer_state.json                   step, data position, loss-mode state, best/stall, counters,
                                       the weights' format and the world size
  mftcore_config.json                  the training config (what `mftcore export` rebuilds the model from)
That is the "hf" format of one process and of DDP (rank 0 writes the weights). Sharded engines keep
their own formats in place of the weights and optimizer files: "dcp" (FSDP2,
torch.distributed.checkpoint shards in dcp/) and "deepspeed" (DeepSpeed's files in deepspeed/).
`export_checkpoint` turns any of them into one HF model or PEFT adapter directory.
Everything but DeepSpeed's files is read back with safetensors or torch.load(weights_only=True).
Directories only ever appear complete (atomic rename; with several ranks, rank 0 renames once every
rank has written), so the newest one is usable even after a SIGKILL in the middle of a save.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import re
import shutil
import uuid

import numpy as np
import torch

from mftcore import distributed
from mftcore.errors import ConfigError

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "mftcore_config.json"
FORMAT_ENGINES = {"hf": "one-process or ddp", "dcp": "fsdp", "deepspeed": "deepspeed"}


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


@contextlib.contextmanager
def shared_atomic_dir(path: str, rank: int = 0):
    """atomic_dir for every rank of a run: rank 0 makes the temporary directory and tells the others
    its name; each rank writes its files; rank 0 renames once all have finished."""
    if not distributed.is_distributed():
        with atomic_dir(path) as tmp:
            yield tmp
        return
    if rank == 0:
        with atomic_dir(path) as tmp:
            distributed.broadcast_object(tmp)
            yield tmp
            distributed.barrier()  # every rank's files are in
    else:
        yield distributed.broadcast_object(None)
        distributed.barrier()
    distributed.barrier()  # renamed: the checkpoint exists for every rank


def remove_dir(path: str) -> None:
    """Rename out of the checkpoint namespace first, so that a kill mid-delete leaves no half checkpoint."""
    doomed = os.path.join(os.path.dirname(path), f".del-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(output_dir: str) -> None:
    """Temporary directories of saves or deletes that a killed run did not finish."""
    for pattern in (".tmp-*", ".old-*", ".del-*"):
        for path in glob.glob(os.path.join(output_dir, pattern)):
            shutil.rmtree(path, ignore_errors=True)


# --- RNG ---------------------------------------------------------------------------------------

def capture_rng() -> dict:
    """Every generator a step can draw from, as tensors and plain numbers (weights_only-loadable)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save --------------------------------------------------------------------------------------

def save_checkpoint(output_dir: str, step: int, engine, scheduler, state: dict, *, config: dict | None = None) -> str:
    """checkpoint-{step}/ as described in the module docstring; every rank calls it."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    rank = engine.rank
    with shared_atomic_dir(path, rank) as tmp:
        if engine.format == "hf":
            if rank == 0:
                engine.model.save_pretrained(tmp, safe_serialization=True)
                torch.save(engine.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        else:
            engine.save_sharded(tmp)
        if rank == 0:
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            if engine.scaler is not None:
                torch.save(engine.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
            if config is not None:
                write_json(os.path.join(tmp, CONFIG_FILE), config, indent=2)
            write_json(os.path.join(tmp, STATE_FILE), {"step": step, "format": engine.format,
                                                       "world_size": engine.world_size, **state})
        torch.save(capture_rng(), os.path.join(tmp, f"rng_state_{rank}.pt"))
    return path


def write_json(path: str, value: dict, indent: int = 1) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=indent)


def save_model_dir(path: str, model, tokenizer, config: dict, state_dict=None) -> str:
    """An HF model (or PEFT adapter) directory with the tokenizer and the training config, so that
    `mftcore generate` knows the role markers it was trained with. state_dict: the weights to write
    when `model` holds only its shard of them."""
    with atomic_dir(path) as tmp:
        kwargs = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        tokenizer.save_pretrained(tmp)
        write_json(os.path.join(tmp, CONFIG_FILE), config, indent=2)
    return path


def save_final(output_dir: str, engine, tokenizer, config: dict) -> str:
    """final/: the trained model as one HF directory. `engine` is a distributed.Engine (every rank
    calls this: sharded engines gather the weights to rank 0) or a bare model."""
    path = os.path.join(output_dir, "final")
    if not hasattr(engine, "full_state_dict"):
        return save_model_dir(path, engine, tokenizer, config)
    state_dict = engine.full_state_dict()
    if engine.rank == 0:
        save_model_dir(path, engine.model, tokenizer, config, state_dict)
    distributed.barrier()
    return path


# --- find, prune -------------------------------------------------------------------------------

def list_checkpoints(output_dir: str) -> list:
    """[(step, path)] of the complete checkpoints in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_DIR.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def prune_checkpoints(output_dir: str, limit, keep_steps) -> list:
    """Delete the oldest checkpoints beyond `limit`, never one whose step is in keep_steps (the best
    and the latest). Returns the deleted paths."""
    if not limit:
        return []
    newest_first = list(reversed(list_checkpoints(output_dir)))
    kept = [s for s, _ in newest_first if s in keep_steps]
    removed = []
    for step, path in newest_first:
        if step in keep_steps:
            continue
        if len(kept) < limit:
            kept.append(step)
        else:
            remove_dir(path)
            removed.append(path)
    return removed


def resolve_resume(cfg):
    """The checkpoint directory to continue from, or None for a fresh run.

    resume_from_checkpoint: a checkpoint directory, or "auto" for the newest in output_dir (a fresh
    run when there is none); null means "auto" when auto_resume is true (MFTCoder's default). A fresh
    run refuses an output_dir that already holds checkpoints: "auto" would later pick a stale one.
    """
    value = cfg.resume_from_checkpoint
    if value is None and cfg.auto_resume:
        value = "auto"
    existing = list_checkpoints(cfg.output_dir)
    if value is None:
        if existing:
            raise ConfigError(f"output_dir: {cfg.output_dir} already holds {os.path.basename(existing[-1][1])} "
                              f"of an earlier run and auto_resume is false; set resume_from_checkpoint=\"auto\" "
                              f"to continue it, or use another output_dir")
        return None
    if value == "auto":
        return existing[-1][1] if existing else None
    if not os.path.isfile(os.path.join(value, STATE_FILE)):
        raise ConfigError(f"resume_from_checkpoint: {value}: not a checkpoint directory (no {STATE_FILE})")
    return value


# --- load --------------------------------------------------------------------------------------

def read_safetensors(path: str, stem: str) -> dict:
    """{name: tensor} of `stem`.safetensors, or of all shards listed by `stem`.safetensors.index.json."""
    from safetensors.torch import load_file

    single = os.path.join(path, f"{stem}.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = single + ".index.json"
    if not os.path.isfile(index):
        raise ConfigError(f"resume_from_checkpoint: {path}: no {stem}.safetensors")
    with open(index, encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(load_file(os.path.join(path, shard)))
    return state


def load_model_weights(path: str, model) -> None:
    """The checkpoint's weights into `model` (adapter weights for a PeftModel), in place."""
    from mftcore.model.adapters import is_adapter_model

    if is_adapter_model(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, read_safetensors(path, "adapter_model"))
        missing = [k for k in result.missing_keys if "lora_" in k]
    else:
        result = model.load_state_dict(read_safetensors(path, "model"), strict=False)
        # Tied weights (lm_head = embed_tokens) are saved once; they come back through their twin.
        own = model.state_dict()
        loaded_ptrs = {own[k].data_ptr() for k in own if k not in set(result.missing_keys)}
        missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
    if missing:
        raise ConfigError(f"resume_from_checkpoint: {path}: the checkpoint lacks {missing[:3]} "
                          f"(was it saved from another model or peft_type?)")


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(path: str, engine, scheduler) -> dict:
    """Restore the model, optimizer, scheduler (and scaler) of `engine` from `path`; returns its trainer
    state. The RNG states are restored last, by `restore_checkpoint_rng`, once nothing else will draw."""
    state = read_state(path)
    saved = state.get("format", "hf")
    if saved != engine.format:
        raise ConfigError(f"resume_from_checkpoint: {path} was saved by a {FORMAT_ENGINES[saved]} run, this run "
                          f"uses distributed_type {engine.kind!r} (export it with `mftcore export` to change engines)")
    if saved == "deepspeed" and state.get("world_size", 1) != engine.world_size:
        raise ConfigError(f"resume_from_checkpoint: {path}: DeepSpeed ZeRO checkpoints resume on as many ranks as "
                          f"saved them ({state.get('world_size')}), not {engine.world_size}")
    if saved == "hf":
        load_model_weights(path, engine.model)
        device = next(engine.model.parameters()).device
        engine.optimizer.load_state_dict(
            torch.load(os.path.join(path, "optimizer.pt"), map_location=device, weights_only=True))
    else:
        engine.load_sharded(path)
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    if saved == "deepspeed":  # ZeRO keeps no param-group lr in its files: take the schedule's
        for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    if engine.scaler is not None:
        scaler_file = os.path.join(path, "scaler.pt")
        if os.path.isfile(scaler_file):
            engine.scaler.load_state_dict(torch.load(scaler_file, weights_only=True))
    return state


def restore_checkpoint_rng(path: str, rank: int = 0) -> bool:
    """This rank's generator states; False (rank 0's used) when the checkpoint was saved by fewer ranks."""
    own = os.path.join(path, f"rng_state_{rank}.pt")
    restore_rng(torch.load(own if os.path.isfile(own) else os.path.join(path, "rng_state_0.pt"), weights_only=True))
    return os.path.isfile(own)


# --- export ------------------------------------------------------------------------------------

def export_checkpoint(path: str, out: str) -> str:
    """One HF model (or PEFT adapter) directory from a checkpoint of any engine, in this one process:
    the model is rebuilt from the checkpoint's mftcore_config.json (so its pretrained_model_path and
    tokenizer_path must resolve from here), then the checkpoint's weights are loaded into it."""
    from mftcore.config import TrainConfig
    from mftcore.data.chat_template import build_chat_template
    from mftcore.model import load_tokenizer
    from mftcore.model.adapters import build_model

    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ConfigError(f"export: {path}: not a checkpoint directory (no {STATE_FILE})")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise ConfigError(f"export: {path}: no {CONFIG_FILE} (saved by an older mftcore); its weights are in place")
    cfg = TrainConfig.from_file(os.path.join(path, CONFIG_FILE))
    tokenizer = load_tokenizer(cfg)
    tokenizer.chat_template = build_chat_template(cfg.role_markers)
    model = build_model(cfg, len(tokenizer), torch.device("cpu"))
    saved = read_state(path).get("format", "hf")
    if saved == "dcp":
        distributed.load_sharded_weights(path, model, cfg.peft_type is not None)
    elif saved == "deepspeed":
        from mftcore.zero import load_zero_weights

        load_zero_weights(path, model, cfg.peft_type is not None)
    else:
        load_model_weights(path, model)
    return save_model_dir(out, model, tokenizer, cfg.to_dict())
