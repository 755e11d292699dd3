"""Packing and `prepare` on the CPU: the C++ best-fit-decreasing packer against plain Python.

    python bench/bench_packing.py [--quick] [--json PATH]
    mftcore bench packing [--quick] [--json PATH]                                     # the same

Lengths: lognormal with mean ~650 tokens, clipped to [8, 4096], packed into rows of 4096. Gates
(bench/gates.json, sections "packing" and "prepare"), in one run: C++ BFD >= 50x faster than the
plain-Python BFD (same algorithm, same result), faster than the plain-Python next-fit, and fills >= 99.9%
of its rows; `prepare` in one process >= 1.25x MFTCoder's way of tokenizing, a plain Python loop that
parses, renders and tokenizes one piece per call (same ids). Also `prepare` throughput: samples/s of the
cache build with 1 and 2 tokenizer processes, on the sample data repeated.

The script times wall clock (what a user waits for); tests/bench/test_gates.py calls the same
measurements with CPU-time clocks, so that a loaded machine cannot fail CI.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

import common
from mftcore.data.packing import best_fit_decreasing, best_fit_decreasing_reference, fill_ratio, next_fit_reference

CAPACITY = 4096
# C++ calls in a row per round (0.4-0.6 s at 1M lengths): the first of a round pays for fresh pages
# (the output array, the sort's vectors: 1.8k page faults, 30-40 ms), the next reuse the allocator's
# memory (0-10 faults, 19-20 ms of thread CPU time on an idle 2-core Xeon); and a job beside it slows
# this memory-bound loop more than the interpreted one (the fastest of 80 calls took 28 ms beside a
# compiler): cheap calls, so many of them, for the fastest to be an undisturbed one.
CPP_BACK_TO_BACK = 20


def lognormal_lengths(n: int, seed: int = 0, mean: float = 650.0, sigma: float = 1.0) -> np.ndarray:
    """Long-tailed sample lengths: lognormal with the given mean before clipping to [8, CAPACITY]."""
    mu = np.log(mean) - sigma ** 2 / 2
    return np.clip(np.random.default_rng(seed).lognormal(mu, sigma, n), 8, CAPACITY).astype(np.int64)


def measure_packing(n: int, rounds: int = 3, clock="wall", max_rounds: int | None = None) -> dict:
    """The C++ packer and both Python ones on the same lengths, interleaved; fastest call of each. With
    `max_rounds`, more rounds (up to that many) while the speed gates are missed."""
    lengths = lognormal_lengths(n)
    t = common.time_interleaved({"python_bfd": lambda: best_fit_decreasing_reference(lengths, CAPACITY),
                                 "python_next_fit": lambda: next_fit_reference(lengths, CAPACITY),
                                 "cpp_bfd": lambda: best_fit_decreasing(lengths, CAPACITY)},
                                rounds, clock, back_to_back={"cpp_bfd": CPP_BACK_TO_BACK},
                                until=speed_gates_pass if max_rounds else None, max_rounds=max_rounds)
    bins, ref, nf = (t.outputs[k] for k in ("cpp_bfd", "python_bfd", "python_next_fit"))
    cpp, py, py_nf = (t.best[k] for k in ("cpp_bfd", "python_bfd", "python_next_fit"))
    return {
        "n": n, "capacity": CAPACITY, "mean_length": float(lengths.mean()), "clock": clock_name(clock),
        "rounds": len(t.runs["python_bfd"]), "cpp_bfd_s": cpp, "python_bfd_s": py, "python_next_fit_s": py_nf,
        "speedup_vs_python_bfd": py / cpp, "speedup_vs_python_next_fit": py_nf / cpp,
        "same_bins_as_python": bool(np.array_equal(bins, ref)),
        "fill_bfd": fill_ratio(lengths, bins, CAPACITY), "fill_next_fit": fill_ratio(lengths, nf, CAPACITY),
        "rows_bfd": int(bins.max()) + 1, "rows_next_fit": int(nf.max()) + 1,
    }


def speed_gates_pass(best: dict) -> bool:
    gates = common.load_gates()["packing"]
    return (best["python_bfd"] / best["cpp_bfd"] >= gates["speedup_vs_python_bfd"]["min"]
            and best["python_next_fit"] / best["cpp_bfd"] >= gates["speedup_vs_python_next_fit"]["min"])


def clock_name(clock) -> str:
    return clock if isinstance(clock, str) else getattr(clock, "__name__", "custom")


def sample_data(directory: str, copies: int) -> list:
    """The shipped sample tasks, each file repeated `copies` times: real chat data at a measurable size."""
    paths = []
    for task in ("python_funcs", "sql_queries", "shell_commands"):
        src = os.path.join(common.ROOT, "examples", "data", task)
        dst = os.path.join(directory, task)
        os.makedirs(dst)
        for name in sorted(os.listdir(src)):
            with open(os.path.join(src, name), "rb") as f:
                data = f.read()
            with open(os.path.join(dst, name), "wb") as f:
                f.write(data * copies)
        paths.append(dst)
    return paths


def sample_config(paths: list, workers: int, cache_dir: str | None = None):
    from mftcore.config import TrainConfig

    return TrainConfig.from_dict({"data_paths": paths, "tokenizer_path": "unused", "seq_length": 4096,
                                  "model_config": {"model_type": "llama"}, "tokenize_workers": workers,
                                  "cache_dir": cache_dir})


def sample_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(common.ROOT, "examples", "tokenizer"))


def measure_prepare(copies: int = 40, workers=(1, 2)) -> dict:
    """Samples/s of a cold cache build (render, tokenize, write), tokenizer already loaded; wall time."""
    from mftcore.data.cache import SampleStore, prepare_cache

    tokenizer, out = sample_tokenizer(), {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = sample_data(tmp, copies)
        for w in workers:
            cfg = sample_config(paths, w, os.path.join(tmp, f"cache-{w}"))
            t = time.perf_counter()
            path, _ = prepare_cache(cfg, tokenizer, tokenizer.eos_token_id, progress=False)
            seconds = time.perf_counter() - t
            store = SampleStore(path)
            out[f"workers_{w}"] = {"samples": len(store), "tokens": int(store.offsets[-1]), "seconds": seconds,
                                   "samples_per_s": len(store) / seconds}
            del store  # its memory maps, before the directory goes
    return out


def plain_loop_tokenize(paths: list, tokenizer, markers: dict, eos_id: int) -> tuple:
    """MFTCoder's way: every line parsed and rendered, every piece tokenized by its own call.
    Returns all ids and masks back to back, in the cache's order (tasks, then files, then lines)."""
    from mftcore.data.cache import jsonl_files
    from mftcore.data.render import join_pieces, render_record

    ids, mask = [], []
    for path in paths:
        for file in jsonl_files(path):
            with open(file, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        segments = render_record(json.loads(line), markers)
                        pieces = [tokenizer(s.text, add_special_tokens=False)["input_ids"] for s in segments]
                        s_ids, s_mask = join_pieces(segments, pieces, eos_id)
                        ids += s_ids
                        mask += s_mask
    return ids, mask


def measure_prepare_vs_plain_loop(copies: int = 10, rounds: int = 5, clock="wall") -> dict:
    """The plain loop over `prepare` (one process, a cold cache each time) on the sample data repeated
    `copies` times, interleaved, fastest of `rounds` calls each. A CPU clock must be "process": the
    tokenizer's batch encoding runs on its own threads."""
    from mftcore.data.cache import SampleStore, prepare_cache

    tokenizer = sample_tokenizer()
    eos = tokenizer.eos_token_id
    with tempfile.TemporaryDirectory() as tmp:
        paths = sample_data(tmp, copies)
        cfg = sample_config(paths, 1)
        builds = iter(range(rounds))

        def prepare():
            cfg.cache_dir = os.path.join(tmp, f"cache-{next(builds)}")  # a cold build every time
            return prepare_cache(cfg, tokenizer, eos, progress=False)[0]

        t = common.time_interleaved({"plain_loop": lambda: plain_loop_tokenize(paths, tokenizer, cfg.role_markers,
                                                                               eos), "prepare": prepare},
                                    rounds, clock)
        ids, mask = t.outputs["plain_loop"]
        store = SampleStore(t.outputs["prepare"])
        same = bool(np.array_equal(store.ids, ids) and np.array_equal(store.mask, mask))
        samples = len(store)
        del store  # its memory maps, before the directory goes
    loop_s, prepare_s = t.best["plain_loop"], t.best["prepare"]
    return {"samples": samples, "tokens": len(ids), "clock": clock_name(clock), "plain_loop_s": loop_s,
            "prepare_s": prepare_s, "prepare_over_plain_loop": loop_s / prepare_s, "same_tokens": same,
            "repeats": rounds, "prepare_samples_per_s": samples / prepare_s,
            "plain_loop_samples_per_s": samples / loop_s}


def run(device: str, quick: bool) -> dict:
    """Everything this script measures. CPU work whatever `device` says: results name the CPU."""
    return {**common.machine_record("cpu"), "cores": os.cpu_count(), "numpy": np.__version__,
            "packing": measure_packing(100_000 if quick else 1_000_000, rounds=2 if quick else 3),
            "prepare": measure_prepare(4 if quick else 40),
            "prepare_vs_plain_loop": measure_prepare_vs_plain_loop(2 if quick else 10, 2 if quick else 5)}


def check_gates(result: dict) -> list:
    """The failed gates of "packing" and "prepare", and any disagreement of the two sides' outputs."""
    failed = (common.gate_failures("packing", result["packing"])
              + common.gate_failures("prepare", result["prepare_vs_plain_loop"]))
    if not result["packing"]["same_bins_as_python"]:
        failed.append("C++ and Python BFD disagree")
    if not result["prepare_vs_plain_loop"]["same_tokens"]:
        failed.append("prepare and the plain loop tokenized differently")
    return failed


def table(result: dict) -> str:
    r, v = result["packing"], result["prepare_vs_plain_loop"]
    lines = [f"packing {r['n']:,} lengths (mean {r['mean_length']:.0f}, clipped to [8, {r['capacity']}]) into rows "
             f"of {r['capacity']}, {r['clock']} time, fastest of {r['rounds']} rounds",
             f"{'packer':<24}{'seconds':>10}{'C++ speedup':>13}{'rows':>10}{'fill':>10}",
             f"{'C++ BFD':<24}{r['cpp_bfd_s']:>10.4f}{1.0:>12.1f}x{r['rows_bfd']:>10}{r['fill_bfd']:>10.5f}",
             f"{'Python BFD':<24}{r['python_bfd_s']:>10.4f}{r['speedup_vs_python_bfd']:>12.1f}x{r['rows_bfd']:>10}"
             f"{r['fill_bfd']:>10.5f}",
             f"{'Python next-fit':<24}{r['python_next_fit_s']:>10.4f}{r['speedup_vs_python_next_fit']:>12.1f}x"
             f"{r['rows_next_fit']:>10}{r['fill_next_fit']:>10.5f}"]
    for key, p in result["prepare"].items():
        lines.append(f"prepare, {key.replace('_', ' ')}: {p['samples']} samples in {p['seconds']:.2f} s = "
                     f"{p['samples_per_s']:.0f} samples/s")
    lines.append(f"prepare, 1 process vs a plain per-sample Python loop, {v['samples']} samples: {v['prepare_s']:.3f} s"
                 f" vs {v['plain_loop_s']:.3f} s = {v['prepare_over_plain_loop']:.2f}x (best of {v['repeats']} each; "
                 f"same ids: {v['same_tokens']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.run_script("packing", run, table, check_gates, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
