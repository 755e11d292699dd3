"""The tokenized-data cache: built once (`mftcore prepare`, or the first `train`), memory-mapped after.

An entry is a directory `<cache_dir>/<digest>/` named by the hash of everything the tokens depend on
(the cache key): each task directory with every *.jsonl file's relative path and the SHA-256 of its
bytes (mftcore/data/files.py: a file rewritten in place with the same size and mtime gets a new
entry), the tokenizer (a hash of its full serialisation), role markers, EOS id, seq_length,
long_sample_policy and skip_bad_samples. Any change gives a new digest, hence a new entry; old entries stay until
deleted by hand. An entry holds
    meta.json      the key, the task names and per-task counts (samples, truncated, dropped, skipped,
                   loss tokens, samples without one) and largest token id (with its file:line)
    input_ids.bin  int32 token ids of all samples back to back (tasks in data_paths order)
    loss_mask.bin  uint8, aligned with input_ids (1 = training target)
    offsets.npy    int64 [N+1] sample boundaries in input_ids
    task_ids.npy   int32 [N] task of each sample
    sources.npy    int64 [N, 2] (file index in meta["files"], line) of each sample
It is written under a temporary name and renamed when complete, so a reader never sees half of one
and two concurrent builders cannot corrupt it; a build killed before the rename leaves a temporary
directory that the next build on the same host removes. Under torchrun, local rank 0 builds and the
other ranks wait for the rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np
from tqdm.auto import tqdm

from mftcore.data.encode import EncodeSpec, encode_lines, read_chunks
from mftcore.data.files import content_digests, jsonl_files
from mftcore.data.formats import encode_options, format_key
from mftcore.data.sources import dataset_sources, location, task_path
from mftcore.data.workers import EncoderProcesses
from mftcore.errors import DataError
from mftcore.io import atomic_dir, atomic_write_json, read_json_object, remove_abandoned, remove_dir

FORMAT = 2  # bump when rendering or the layout changes: every old entry is then ignored (2: content keys)
MAX_SKIP_EXAMPLES = 3


def task_names(paths: list) -> list:
    """Directory basenames; a basename used twice gets its position appended ("code", "code_2")."""
    names = []
    for p in paths:
        base = os.path.basename(os.path.normpath(task_path(p))) or "task"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the tokenizer's ids (its full serialisation when it has one)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(repr(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()


def task_files(entry) -> list:
    """A task's sources in order: JSONL file paths, or DatasetSources (mftcore/data/sources.py)."""
    found = dataset_sources(entry)
    return jsonl_files(task_path(entry)) if found is None else found


def cache_key(cfg, tokenizer, eos_id: int, remember: bool = True) -> dict:
    listed = [task_files(entry) for entry in cfg.data_paths]
    digests = content_digests([f for found in listed for f in found if isinstance(f, str)], default_cache_dir(cfg),
                              remember)
    tasks = []
    for entry, found in zip(cfg.data_paths, listed):
        path, files = task_path(entry), []
        for f in found:
            if not isinstance(f, str):  # a dataset: its fingerprint
                files.append(f.key())
                continue
            files.append([os.path.relpath(f, path) if f != path else os.path.basename(f), digests[f]])
        tasks.append({"path": os.path.abspath(path), "files": files})
    return {"format": FORMAT, "tasks": tasks, "tokenizer": tokenizer_fingerprint(tokenizer),
            "markers": cfg.role_markers, "eos_id": int(eos_id), "seq_length": cfg.seq_length,
            "long_sample_policy": cfg.long_sample_policy, "skip_bad_samples": cfg.skip_bad_samples,
            **format_key(encode_options(cfg, tokenizer), tokenizer)}


def default_cache_dir(cfg) -> str:
    """`cache_dir`, else `mftcore_cache` next to output_dir (runs under one parent share it)."""
    if cfg.cache_dir:
        return cfg.cache_dir
    return os.path.join(os.path.dirname(os.path.abspath(cfg.output_dir)), "mftcore_cache")


def entry_dir(cfg, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(default_cache_dir(cfg), digest)


def prepare_cache(cfg, tokenizer, eos_id: int, *, local_rank: int = 0, progress: bool = True,
                  wait_timeout: float = 24 * 3600) -> tuple[str, bool]:
    """The cache entry for this config: (directory, reused). Builds it when missing (local rank 0)."""
    key = cache_key(cfg, tokenizer, eos_id, remember=local_rank == 0)
    path = entry_dir(cfg, key)
    if os.path.isfile(os.path.join(path, "meta.json")):
        problem = entry_problem(path)
        if problem is None:
            return path, True
        if local_rank != 0:
            raise DataError(f"{path}: the data cache entry is damaged ({problem}); local rank 0 rebuilds it: run again")
        print(f"mftcore: note: {path}: the data cache entry is damaged ({problem}); building it again",
              file=sys.stderr)
        remove_dir(path)  # derived data, rebuilt from the files below
    if local_rank != 0:
        wait_for(path, wait_timeout)
        return path, True
    build(path, key, cfg, tokenizer, eos_id, progress)
    return path, False


def entry_problem(path: str) -> str | None:
    """Why a finished cache entry cannot be read as it is (a file truncated or replaced since), or None."""
    try:
        meta = read_json_object(os.path.join(path, "meta.json"), error=DataError)
        offsets = np.load(os.path.join(path, "offsets.npy"), mmap_mode="r")
        n, tokens = int(meta["num_samples"]), int(offsets[-1])
        for name, rows in (("task_ids.npy", n), ("sources.npy", n)):
            if len(np.load(os.path.join(path, name), mmap_mode="r")) != rows:
                return f"{name} does not match meta.json"
        if len(offsets) != n + 1:
            return "offsets.npy does not match meta.json"
        for name, size in (("input_ids.bin", 4 * tokens), ("loss_mask.bin", tokens)):
            if os.path.getsize(os.path.join(path, name)) != size:
                return f"{name} is {os.path.getsize(os.path.join(path, name))} bytes, expected {size}"
    except (DataError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return str(e).split(": ", 1)[-1][:200] or type(e).__name__
    return None


def wait_for(path: str, timeout: float) -> None:
    """Another process (local rank 0) is building this entry; it appears at once when renamed."""
    print(f"mftcore: waiting for local rank 0 to build the data cache {path}", file=sys.stderr)
    deadline = time.monotonic() + timeout
    while not os.path.isfile(os.path.join(path, "meta.json")):
        if time.monotonic() > deadline:
            raise DataError(f"{path}: the data cache did not appear within {timeout:.0f} s")
        time.sleep(0.5)


def worker_count(cfg) -> int:
    return cfg.tokenize_workers or min(8, os.cpu_count() or 1)


def encoded_chunks(jobs, tokenizer, spec: EncodeSpec, workers: int):
    """Encode ((lines, first_line, task), tag) jobs, yielding (EncodedChunk, tag) in job order: in-process,
    or in `workers` processes (mftcore/data/workers.py) with one chunk in flight each, so that memory
    stays flat however large the files are."""
    if workers <= 1:
        for (lines, first, task), tag in jobs:
            yield encode_lines(lines, first, tokenizer, spec, task), tag
        return
    procs = EncoderProcesses(workers, tokenizer, spec)
    try:
        yield from procs.map_ordered(jobs)
    except BaseException:  # an error, a signal, or the consumer stopped early (GeneratorExit)
        procs.kill()
        raise
    procs.close()


def build(path: str, key: dict, cfg, tokenizer, eos_id: int, progress: bool) -> None:
    """Tokenize every task into a temporary directory, then rename it to `path`."""
    spec = EncodeSpec(dict(cfg.role_markers), int(eos_id), cfg.seq_length, cfg.long_sample_policy,
                      **encode_options(cfg, tokenizer))
    files = [(t, f) for t, p in enumerate(cfg.data_paths) for f in task_files(p)]
    tasks = [{"name": n, "path": task_path(p), "samples": 0, "truncated": 0, "dropped": 0, "skipped": 0,
              "skip_examples": [], "loss_tokens": 0, "no_loss_samples": 0, "max_id": -1, "max_id_at": None}
             for n, p in zip(task_names(cfg.data_paths), cfg.data_paths)]
    jobs = (((lines, first, t), (fi, size)) for fi, (t, f) in enumerate(files)
            for lines, first, size in (read_chunks(f) if isinstance(f, str) else f.chunks()))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_abandoned(os.path.dirname(path))
    # Several runs may build the same entry at once: the first to finish wins, the others' are dropped.
    with atomic_dir(path, replace=False, owned=True) as tmp:
        lengths, task_ids, sources = [], [], []
        # On a terminal only (tqdm's disable=None), so that logs and error output stay one line each.
        total = sum(os.path.getsize(f) if isinstance(f, str) else f.nbytes for _, f in files)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize",
                   disable=None if progress else True, file=sys.stderr, dynamic_ncols=True)
        with bar, open(os.path.join(tmp, "input_ids.bin"), "wb") as f_ids, \
                open(os.path.join(tmp, "loss_mask.bin"), "wb") as f_mask:
            for chunk, (fi, nbytes) in encoded_chunks(jobs, tokenizer, spec, worker_count(cfg)):
                t, file = files[fi]
                task = tasks[t]
                for line, reason in chunk.bad:
                    if not cfg.skip_bad_samples:
                        raise DataError(f"{location(file, line)}: {reason}")
                    task["skipped"] += 1
                    if len(task["skip_examples"]) < MAX_SKIP_EXAMPLES:
                        task["skip_examples"].append(f"{location(file, line)}: {reason}")
                chunk.ids.tofile(f_ids)
                chunk.mask.tofile(f_mask)
                lengths.append(chunk.lengths)
                task_ids.append(np.full(len(chunk.lengths), t, dtype=np.int32))
                sources.append(np.stack([np.full(len(chunk.lines), fi, dtype=np.int64), chunk.lines], axis=1))
                task["samples"] += len(chunk.lengths)
                task["truncated"] += chunk.truncated
                task["dropped"] += chunk.dropped
                task["loss_tokens"] += chunk.loss_tokens
                task["no_loss_samples"] += chunk.no_loss
                if chunk.max_id > task["max_id"]:
                    task["max_id"], task["max_id_at"] = int(chunk.max_id), location(file, chunk.max_id_line)
                bar.update(nbytes)
        check_tasks(tasks, cfg)
        write_index(tmp, np.concatenate(lengths), np.concatenate(task_ids), np.concatenate(sources))
        meta = {"format": FORMAT, "key": key, "files": [str(f) for _, f in files], "tasks": tasks,
                "num_samples": int(sum(t["samples"] for t in tasks))}
        atomic_write_json(os.path.join(tmp, "meta.json"), meta)


def check_tasks(tasks: list, cfg) -> None:
    """Every task must have samples and something to learn from. A task whose samples hold no loss token
    (no assistant turn, or seq_length cuts every answer off) would train on nothing while weight decay
    still moves the weights: an error, or with skip_bad_samples a warning in the start-up report."""
    for task in tasks:
        if task["samples"] == 0:
            why = []
            if task["skipped"]:
                why.append(f"all {task['skipped']} lines were bad")
            if task["dropped"]:
                why.append(f"{task['dropped']} longer than seq_length={cfg.seq_length} were dropped "
                           "(long_sample_policy \"drop\"; \"truncate\" keeps their beginning)")
            raise DataError(f"{task['path']}: the task has no samples" + (f" ({'; '.join(why)})" if why else ""))
    empty = [t for t in tasks if t["loss_tokens"] == 0]
    if len(empty) == len(tasks) or (empty and not cfg.skip_bad_samples):
        t = empty[0]
        raise DataError(f"{t['path']}: the task has no loss tokens: none of its {t['samples']} samples has an "
                        f"assistant answer within seq_length={cfg.seq_length}, so it would train on nothing"
                        + ("" if len(empty) == len(tasks) else " (skip_bad_samples: true trains the other tasks)"))


def write_index(directory: str, lengths: np.ndarray, task_ids: np.ndarray, sources: np.ndarray) -> None:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(os.path.join(directory, "offsets.npy"), offsets)
    np.save(os.path.join(directory, "task_ids.npy"), task_ids)
    np.save(os.path.join(directory, "sources.npy"), sources)


class SampleStore:
    """All samples of one cache entry, memory-mapped: store[i] reads only sample i's bytes."""

    def __init__(self, path: str):
        self.path = path
        self.meta = read_json_object(os.path.join(path, "meta.json"), error=DataError)
        self.offsets = np.load(os.path.join(path, "offsets.npy"), mmap_mode="r")
        self.task_ids = np.load(os.path.join(path, "task_ids.npy"), mmap_mode="r")
        self.sources = np.load(os.path.join(path, "sources.npy"), mmap_mode="r")
        n_tokens = int(self.offsets[-1])
        self.ids = np.memmap(os.path.join(path, "input_ids.bin"), dtype=np.int32, mode="r", shape=(n_tokens,))
        self.mask = np.memmap(os.path.join(path, "loss_mask.bin"), dtype=np.uint8, mode="r", shape=(n_tokens,))
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def sample(self, i: int):
        """(input_ids int64, loss_mask uint8, task_id) of sample i, copied out of the map."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.array(self.ids[a:b], dtype=np.int64), np.array(self.mask[a:b]), int(self.task_ids[i])

    def task_range(self, task_id: int) -> tuple[int, int]:
        """Samples of one task are contiguous: [start, end)."""
        start = sum(t["samples"] for t in self.meta["tasks"][:task_id])
        return start, start + self.meta["tasks"][task_id]["samples"]

    def source(self, i: int) -> tuple[str, int]:
        fi, line = self.sources[i]
        return self.meta["files"][int(fi)], int(line)
