"""The checkpoint directory protocol: what checkpoint-<step>/ holds, how it appears (atomically), which
one a run resumes from, which ones are pruned, and the random-number generator states.

A checkpoint holds the engine's files (`engine.save`: HF safetensors + optimizer.pt for one process
and DDP, torch.distributed.checkpoint shards for FSDP2, DeepSpeed's own files), scheduler.pt, the
training config (mftcore_config.json), trainer_state.json (step, engine, format, world size, the loop's
counters, the data position and the loss-mode state) and one rng_state_<rank>.pt per rank. Everything
but DeepSpeed's files is read back with safetensors or torch.load(weights_only=True). Directories only
ever appear complete (atomic rename; with several ranks, rank 0 renames once every rank has written),
so the newest one is usable even after a SIGKILL in the middle of a save; manifest.json, written
last, lists every file and its size.

Before a checkpoint is used, `checkpoint_problem` checks it whole (mftcore/integrity.py): every file
of the manifest at its size, trainer_state.json and the configs parseable, the format read off the
files (a `format` claim they contradict is refused), the engine's files (`Engine.files_problem`),
scheduler.pt and each rank's RNG state. Auto-resume names a damaged checkpoint and falls back to the
newest intact one; the damaged one is never deleted (a later save of the same step moves it aside to
checkpoint-N.damaged). An explicit resume_from_checkpoint that is damaged is a one-line error. `mftcore export`
(commands/export.py) turns a checkpoint of any engine into one HF model directory.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sys

import numpy as np
import torch

from mftcore.errors import ConfigError, MftcoreError
from mftcore.integrity import CheckpointError, json_problem, load_torch_file, torch_file_problem
from mftcore.io import (
    CONFIG_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    atomic_dir,
    atomic_write_json,
    read_json_object,
    remove_dir,
    tree_size,
)
from mftcore.parallel import ENGINES, comm

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


@contextlib.contextmanager
def shared_atomic_dir(path: str, rank: int = 0):
    """atomic_dir for every rank of a run: rank 0 makes the temporary directory and tells the others
    its name; each rank writes its files; rank 0 renames once all have finished."""
    need = previous_size(os.path.dirname(path))
    if not comm.is_distributed():
        with atomic_dir(path, need=need) as tmp:
            yield tmp
            write_manifest(tmp)
        return
    if rank == 0:
        with atomic_dir(path, need=need) as tmp:
            comm.broadcast_object(tmp)
            yield tmp
            comm.barrier()  # every rank's files are in
            write_manifest(tmp)
    else:
        yield comm.broadcast_object(None)
        comm.barrier()
    comm.barrier()  # renamed: the checkpoint exists for every rank


def write_manifest(directory: str) -> None:
    """manifest.json: every file of the finished checkpoint and its size, so that a truncated or missing
    file of any engine is found before anything is loaded."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory)
            if rel != MANIFEST_FILE:
                files[rel.replace(os.sep, "/")] = os.path.getsize(full)
    atomic_write_json(os.path.join(directory, MANIFEST_FILE), {"files": dict(sorted(files.items()))})


def previous_size(output_dir: str):
    """The newest checkpoint's size: what the next one will need, for the message when the disk is full."""
    done = list_checkpoints(output_dir)
    return tree_size(done[-1][1]) if done else None


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
    if rank == 0 and os.path.isdir(path) and checkpoint_problem(path):
        set_aside(path)  # a damaged one that auto-resume passed over: kept, out of the way
    comm.barrier()
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
    # Never one beyond the newest kept step: after a fallback from a damaged checkpoint those are the
    # damaged ones, which are not ours to delete.
    top = max((k for k in keep_steps if k is not None), default=None)
    newest_first = [(s, p) for s, p in reversed(list_checkpoints(output_dir)) if top is None or s <= top]
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


def set_aside(path: str) -> str:
    aside, k = f"{path}.damaged", 2
    while os.path.lexists(aside):
        aside, k = f"{path}.damaged-{k}", k + 1
    os.replace(path, aside)
    print(f"mftcore: note: {path} was damaged; kept as {aside} (this run writes a new {os.path.basename(path)})",
          file=sys.stderr)
    return aside


def candidate_checkpoints(output_dir: str) -> list:
    """[(step, path)] of every checkpoint-N directory, complete or not, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, n)) for n in os.listdir(output_dir)
             if (m := CHECKPOINT_DIR.match(n)) and os.path.isdir(os.path.join(output_dir, n))]
    return sorted(found)


def resolve_resume(cfg, rank: int = 0):
    """The checkpoint directory to continue from, or None for a fresh run.

    resume_from_checkpoint: a checkpoint directory, or "auto" for the newest intact one in output_dir (a
    fresh run when there is none; a damaged one is named and passed over, never deleted); null means
    "auto" when auto_resume is true (MFTCoder's default). A fresh run refuses an output_dir that already
    holds checkpoints: "auto" would later pick a stale one.
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
        candidates = candidate_checkpoints(cfg.output_dir)
        damaged = []
        for _, path in reversed(candidates):
            problem = checkpoint_problem(path)
            if problem is None:
                if damaged and rank == 0:
                    print(f"mftcore: resuming from {path}, the newest intact checkpoint", file=sys.stderr)
                return path
            damaged.append((path, problem))
            if rank == 0:
                print(f"mftcore: note: {path} is damaged ({problem}); it is left as it is", file=sys.stderr)
        if damaged:
            path, problem = damaged[0]
            raise CheckpointError(f"resume_from_checkpoint: every checkpoint in {cfg.output_dir} is damaged (the "
                                  f"newest, {os.path.basename(path)}: {problem}); move them aside to start afresh")
        return None
    if not os.path.isdir(value) or not os.path.isfile(os.path.join(value, STATE_FILE)):
        raise ConfigError(f"resume_from_checkpoint: {value}: not a checkpoint directory (no {STATE_FILE})")
    problem = checkpoint_problem(value)
    if problem:
        raise CheckpointError(f"resume_from_checkpoint: {value}: damaged: {problem}")
    return value


# --- validation --------------------------------------------------------------------------------

# trainer_state.json: what its keys must hold before anything trusts them (None: null allowed).
STATE_TYPES = {"step": (int,), "engine": (str,), "format": (str,), "world_size": (int,), "total_steps": (int,),
               "weighted_loss_mode": (str,), "data": (dict,), "best_loss": (int, float, type(None)),
               "best_step": (int, type(None)), "stall": (int,), "early_stopped": (bool,), "skipped_steps": (int,),
               "overflow_steps": (int,), "nonfinite_in_a_row": (int,), "skips": (list,), "evaluations": (list,),
               "loss_mode": (dict, type(None)), "valid_sampler": (dict, type(None))}
DATA_TYPES = {"epoch": int, "step_in_epoch": int}


def state_problem(state: dict, path: str) -> str | None:
    for key, types in STATE_TYPES.items():
        if key in state and (not isinstance(state[key], types) or (bool in types) != isinstance(state[key], bool)):
            return f"{STATE_FILE}: {key} is {type(state[key]).__name__}, not {' or '.join(t.__name__ for t in types)}"
    for key in ("step", "data"):
        if key not in state:
            return f"{STATE_FILE}: no {key!r}"
    m = CHECKPOINT_DIR.match(os.path.basename(os.path.normpath(path)))
    if m and int(m.group(1)) != state["step"]:
        return f"{STATE_FILE}: step {state['step']} in a directory named {os.path.basename(path)}"
    if state.get("world_size", 1) < 1 or state["step"] < 0:
        return f"{STATE_FILE}: negative step or world_size"
    for key in (*DATA_TYPES, "consumed", "units", "units_per_step", "world_size"):
        value = state["data"].get(key, 0 if key not in DATA_TYPES else None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{STATE_FILE}: data.{key} must be an integer >= 0, got {value!r}"
    return None


def format_of(path: str, state: dict):
    """(engine class, None) for the format its files show, or (None, why not). The claim in
    trainer_state.json is checked against the files, never taken as it is."""
    held = {e.format: e for e in ENGINES.values() if e.holds(path)}
    claim = state.get("format", "hf")
    if not held:
        return None, "no model weights or engine files in it"
    if len(held) > 1:
        return None, f"it holds the files of several checkpoint formats ({', '.join(sorted(held))})"
    (actual, engine), = held.items()
    if claim != actual:
        return None, f"{STATE_FILE} says format {claim!r}, but its files are a {actual!r} checkpoint"
    return engine, None


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be used as it is (module docstring), or None."""
    if not os.path.isdir(path):
        return "not a directory"
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        return f"{STATE_FILE} is missing"
    try:
        state = read_json_object(state_path, error=CheckpointError)
    except CheckpointError as e:
        return str(e).replace(path + os.sep, "")
    problem = state_problem(state, path) or manifest_problem(path)
    if problem:
        return problem
    engine, problem = format_of(path, state)
    if problem:
        return problem
    problem = engine.files_problem(path, state)
    if problem:
        return problem
    names = ["scheduler.pt"] + [f"rng_state_{r}.pt" for r in range(state.get("world_size", 1))]
    for name in names:
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
        problem = torch_file_problem(os.path.join(path, name))
        if problem:
            return problem
    for name in (CONFIG_FILE, "config.json"):
        if os.path.exists(os.path.join(path, name)):
            problem = json_problem(os.path.join(path, name))
            if problem:
                return problem
    return None


def manifest_problem(path: str) -> str | None:
    """Every file the manifest lists, at the size it lists (checkpoints from before manifests have none)."""
    manifest = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(manifest):
        return None
    try:
        files = read_json_object(manifest, error=CheckpointError).get("files")
    except CheckpointError as e:
        return str(e).replace(path + os.sep, "")
    if not isinstance(files, dict):
        return f"{MANIFEST_FILE}: no file list"
    for rel, size in files.items():
        full = os.path.join(path, *str(rel).split("/"))
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel}: {os.path.getsize(full)} bytes, the manifest says {size} (truncated or overwritten)"
    return None


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
    with load_errors(path):
        engine.load(path, state)
        scheduler.load_state_dict(load_torch_file(os.path.join(path, "scheduler.pt")))
    # The optimizer's learning rates are the schedule's (DeepSpeed's files do not keep them; elsewhere
    # this sets the values the optimizer state already holds).
    for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    return state


def restore_checkpoint_rng(path: str, rank: int = 0) -> bool:
    """This rank's generator states; False (rank 0's used) when the checkpoint was saved by fewer ranks."""
    own = os.path.join(path, f"rng_state_{rank}.pt")
    with load_errors(path):
        restore_rng(load_torch_file(own if os.path.isfile(own) else os.path.join(path, "rng_state_0.pt")))
    return os.path.isfile(own)


@contextlib.contextmanager
def load_errors(path: str):
    """Whatever else goes wrong loading a checked checkpoint (a state of the wrong shape, a file changed
    since the check) as one line naming it."""
    try:
        yield
    except MftcoreError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError, OSError, EOFError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"resume_from_checkpoint: {path}: cannot be loaded ({type(e).__name__}: "
                              f"{first[:200]})") from None


STRUCTURAL_KEYS = ("model_config", "peft_type", "lora_rank", "target_modules")


def check_same_model(path: str, config: dict) -> None:
    """The keys that decide the checkpoint's tensors must be the run's: another model_config would not
    load (or worse, load into the wrong places)."""
    saved_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(saved_path):
        return
    saved = read_json_object(saved_path, error=CheckpointError)
    for key in STRUCTURAL_KEYS:
        if key in saved and saved[key] != config.get(key):
            mine, theirs = config.get(key), saved[key]
            if isinstance(mine, dict) and isinstance(theirs, dict):
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in diff[:3])
            else:
                detail = f"{theirs!r} there, {mine!r} here"
            raise ConfigError(f"{key}: differs from the checkpoint {path} ({detail}); resume it with the config "
                              f"it was trained with, or use another output_dir")
