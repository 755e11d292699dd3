"""bench/bench_data.py: its memory probe measures a process tree, its table and gates read its results.
(The 5M-record run itself is `mftcore bench data`: minutes, so not here.)"""

import os
import sys

from tests.bench.scripts import bench_script

bench_data = bench_script("bench_data")


def test_memory_probe_sees_the_process_tree():
    """A process that holds 200 MB, and a fork of it that holds another 200 MB for 3 s (tens of 50 ms polls
    even on a loaded machine): RSS counts both, the probe sums the tree; PSS never exceeds RSS."""
    script = ("import os, sys, time\nb = bytearray(200_000_000); b[::4096] = b'x' * len(b[::4096])\n"
              "pid = os.fork()\nif pid == 0:\n    c = bytearray(200_000_000); c[::4096] = b'y' * len(c[::4096]);"
              " time.sleep(3); os._exit(0)\nos.waitpid(pid, 0)\nprint(7)\n")
    rss, pss, out, seconds = bench_data.peak_memory_of([sys.executable, "-c", script], dict(os.environ))
    assert out.strip() == "7" and 0.55e9 < rss and 0.35e9 < pss <= rss


def test_table_and_gates():
    throughput = {"samples": 10, "clock": "process", "rounds": 1, "jsonl_samples_per_s": 1.0,
                  "parquet_samples_per_s": 0.5, "parquet_over_jsonl": 0.5, "same_tokens": True,
                  "open_cold_s": 0.2}
    memory = {"records": 5, **{name: {"peak_rss_gb": 1.0, "peak_pss_gb": 0.5, "samples": 5, "seconds": 1.0,
                                      "input_mb": 1.0, "peak_under_2gb": True} for name in ("jsonl", "parquet")}}
    result = {"throughput": throughput, "throughput_wall": {**throughput, "clock": "wall"}, "memory": memory}
    text = bench_data.table(result)
    assert "process time" in text and "wall time" in text and "= 0.50x" in text and "peak PSS 0.50 GB" in text
    failed = bench_data.check_gates(result)
    assert len(failed) == 1 and failed[0].startswith("gate data.parquet_over_jsonl: measured 0.5 < minimum 0.9")
    memory["parquet"].update(peak_pss_gb=2.5, peak_under_2gb=False)
    assert bench_data.check_gates(result)[1] == "parquet: peak memory (PSS) 2.50 GB >= 2 GB"
