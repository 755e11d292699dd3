"""The throughput and memory gates of bench/gates.json, on the CPU, as CI runs them.

Each gate is a ratio of ours over a baseline measured in the same test. Where it is a time, the test
reads CPU time, not wall time: of the measuring thread for the packers (one thread each), of the
process for `prepare` (the tokenizer's batch encoding runs on threads of its own). A job running
beside the test takes wall time from both sides, but unequally (issue 14: 40x and 47x < 50x for the
packer while other jobs ran); CPU time leaves out the time the scheduler gave to others. Calls are
interleaved (a change of load falls on both sides) and the fastest of several counts (the least
disturbed). `mftcore bench packing` times the same calls in wall time. A failing gate fails with the
measured ratio; the margins are written beside each gate in gates.json.
"""

from tests.bench.scripts import bench_script

common = bench_script("common")
bench_packing = bench_script("bench_packing")
bench_cross_entropy = bench_script("bench_cross_entropy")
GATES = common.load_gates()


def report(section: str, measured: dict) -> list:
    """The gate failures of `section`, and the measured ratios printed (shown with -s or on failure)."""
    clock = f", {measured['clock']} time" if "clock" in measured else ""
    for key in GATES[section]:
        if not key.startswith("_"):
            print(f"gate {section}.{key}: measured {measured[key]:.6g} (minimum {GATES[section][key]['min']:g}{clock})")
    return common.gate_failures(section, measured, GATES)


def test_packing_gates_at_1m():
    """The benchmark's gates at its size, 1M lengths: C++ >= 50x the same algorithm in Python (and the same
    bins), faster than a Python next-fit, rows >= 99.9% full. Thread CPU time, at least 3 interleaved
    rounds (1 Python call, 20 C++ calls: 2 s of CPU), and up to 15 while a speed gate is missed. CPU time
    does not leave out everything: a compiler running beside it slowed the memory-bound C++ loop by half
    (thread CPU time 28 ms for the fastest of 80 calls, 19 ms when quiet) and the interpreted one by 5%,
    so on a busy machine the test goes on until a quiet moment, and takes longer instead of failing.
    (The gate stays at 1M, its size: at 100k the C++ side's 2 MB fit in cache and the ratio differs.)"""
    result = bench_packing.measure_packing(1_000_000, rounds=3, clock="thread", max_rounds=15)
    print(f"packing: {result['rounds']} rounds, C++ {result['cpp_bfd_s'] * 1e3:.1f} ms, Python BFD "
          f"{result['python_bfd_s']:.3f} s, thread CPU time")
    failed = report("packing", result)
    assert failed == [] and result["same_bins_as_python"], (failed, result)
    assert result["fill_next_fit"] < 0.9  # the baseline really is the weaker packer


def test_cross_entropy_cpu_path_chunks_its_logits():
    """Peak RSS of one forward+backward, each in a fresh process: the naive logits path >= 4x the chunked
    CPU path (8x measured at this shape; the issue's N=8192, H=1024, V=32000 is in bench/results/). Memory,
    not time: a loaded machine does not move it."""
    shape = (4096, 256, 16000)
    naive = bench_cross_entropy.peak_memory_in_subprocess("naive", shape)["peak_extra_bytes"]
    chunked = bench_cross_entropy.peak_memory_in_subprocess("chunked", shape)["peak_extra_bytes"]
    failed = report("cross_entropy", {"naive_over_chunked_peak_memory": naive / chunked})
    assert failed == [], (failed, {"naive_bytes": naive, "chunked_bytes": chunked})


def test_prepare_beats_a_plain_per_sample_loop():
    """`prepare` in one process (batched Rust tokenization, chunked reads, a memory-mapped cache written)
    against MFTCoder's way of tokenizing: the same ids, >= 1.25x faster in process CPU time, best of 5
    interleaved runs."""
    result = bench_packing.measure_prepare_vs_plain_loop(copies=8, rounds=5, clock="process")
    assert result["same_tokens"], "prepare and the plain loop tokenized the sample data differently"
    failed = report("prepare", result)
    assert failed == [], (failed, result)


bench_data = bench_script("bench_data")


def test_prepare_from_parquet_keeps_up_with_jsonl():
    """The same chat records as parquet (read through datasets) and as JSONL: the same ids, and parquet
    >= 0.9x the JSONL samples/s in CPU time of the measuring thread (the tokenizer on it alone), fastest of 3
    interleaved builds of a fresh cache each, and up to 10 while the gate is missed (beside other jobs even
    thread time moved by +-12% a round: 0.88x and 1.12x in two runs of 3), on the sample data x24 (11.5k
    samples: on x10 the fixed cost of a build weighed enough to read 0.85x-0.95x). (The 5M-record memory
    gate is `mftcore bench data`'s: minutes, not CI.)"""
    result = bench_data.measure_throughput(copies=24, rounds=3, clock="thread", max_rounds=10)
    assert result["same_tokens"], "parquet and JSONL tokenized the sample data differently"
    failed = report("data", result)
    assert failed == [], (failed, result)
