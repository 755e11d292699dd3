"""The checkpoint directory protocol: what checkpoint-<step>/ holds, how it appears (atomically), which
one a run resumes from, which ones are pruned, and the random-number generator states.

A checkpoint holds the engine's files (`engine.save`: HF safetensors + optimizer.pt for one process
and DDP, torch.distributed.checkpoint shards for FSDP2, DeepSpeed's own files), scheduler.pt, the
training config (mftcore_config.json), trainer_state.json (step, engine, format, world size, the loop's
counters, the data position and the loss-mode state) and one rng_state_<rank>.pt per rank. Everything
but DeepSpeed's files is read back with safetensors or torch.load(weights_only=True). Directories only
ever appear complete (atomic rename; with several ranks, rank 0 renames once every rank has written),
so the newest one is usable even after a SIGKILL in the middle of a save. `mftcore export`
(commands/export.py) turns a checkpoint of any engine into one HF model directory.
"""

from __future__ import annotations

import contextlib
import os
import random
import re

import numpy as np
import torch

from mftcore.errors import ConfigError
from mftcore.io import CONFIG_FILE, STATE_FILE, atomic_dir, atomic_write_json, read_json_object, remove_dir
from mftcore.parallel import ENGINES, comm

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


@contextlib.contextmanager
def shared_atomic_dir(path: str, rank: int = 0):
    """atomic_dir for every rank of a run: rank 0 makes the temporary directory and tells the others
    its name; each rank writes its files; rank 0 renames once all have finished."""
    if not comm.is_distributed():
        with atomic_dir(path) as tmp:
            yield tmp
        return
    if rank == 0:
        with atomic_dir(path) as tmp:
            comm.broadcast_object(tmp)
            yield tmp
            comm.barrier()  # every rank's files are in
    else:
        yield comm.broadcast_object(None)
        comm.barrier()
    comm.barrier()  # renamed: the checkpoint exists for every rank


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
        engine.save(tmp)
        if rank == 0:
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            if config is not None:
                atomic_write_json(os.path.join(tmp, CONFIG_FILE), config, indent=2)
            atomic_write_json(os.path.join(tmp, STATE_FILE), {"step": step, "engine": engine.name,
                                                              "format": engine.format,
                                                              "world_size": engine.world_size, **state})
        torch.save(capture_rng(), os.path.join(tmp, f"rng_state_{rank}.pt"))
    return path


def save_model_dir(path: str, model, tokenizer, config: dict, state_dict=None) -> str:
    """An HF model (or PEFT adapter) directory with the tokenizer and the training config, so that
    `mftcore generate` knows the role markers it was trained with. state_dict: the weights to write
    when `model` holds only its shard of them."""
    with atomic_dir(path) as tmp:
        kwargs = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(os.path.join(tmp, CONFIG_FILE), config, indent=2)
    return path


def save_final(output_dir: str, engine, tokenizer, config: dict) -> str:
    """final/: the trained model as one HF directory; every rank calls it (a sharded engine gathers the
    weights to rank 0)."""
    path = os.path.join(output_dir, "final")
    state_dict = engine.full_state_dict()
    if engine.rank == 0:
        save_model_dir(path, engine.model, tokenizer, config, state_dict)
    comm.barrier()
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

def read_state(path: str) -> dict:
    return read_json_object(os.path.join(path, STATE_FILE))


def load_checkpoint(path: str, engine, scheduler) -> dict:
    """Restore the engine's model and optimizer and the scheduler from `path`; returns its trainer
    state. The RNG states are restored last, by `restore_checkpoint_rng`, once nothing else will draw."""
    state = read_state(path)
    saved = state.get("format", "hf")
    if saved != engine.format:
        runs = " or ".join(e.label for e in ENGINES.values() if e.format == saved) or saved
        raise ConfigError(f"resume_from_checkpoint: {path} was saved by a {runs} run, this run uses distributed_type "
                          f"{engine.name!r} (export it with `mftcore export` to change engines)")
    engine.load(path, state)
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    # The optimizer's learning rates are the schedule's (DeepSpeed's files do not keep them; elsewhere
    # this sets the values the optimizer state already holds).
    for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    return state


def restore_checkpoint_rng(path: str, rank: int = 0) -> bool:
    """This rank's generator states; False (rank 0's used) when the checkpoint was saved by fewer ranks."""
    own = os.path.join(path, f"rng_state_{rank}.pt")
    restore_rng(torch.load(own if os.path.isfile(own) else os.path.join(path, "rng_state_0.pt"), weights_only=True))
    return os.path.isfile(own)
