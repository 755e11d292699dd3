"""bench/bench_data.py: the memory measurement runs (at a small size here) and its table and gates read it."""

from tests.bench.scripts import bench_script

bench_data = bench_script("bench_data")


def test_memory_measurement_and_table():
    memory = bench_data.measure_memory(2_000)  # the 5M run is `mftcore bench data`: minutes
    for name in ("jsonl", "parquet"):
        r = memory[name]
        assert r["samples"] == 2_000 and 0 < r["peak_pss_gb"] <= r["peak_rss_gb"] and r["peak_under_2gb"]
    result = {"throughput": {"samples": 10, "clock": "wall", "rounds": 1, "jsonl_samples_per_s": 1.0,
                             "parquet_samples_per_s": 0.5, "parquet_over_jsonl": 0.5, "same_tokens": True},
              "memory": memory}
    assert "= 0.50x" in bench_data.table(result) and "peak PSS" in bench_data.table(result)
    failed = bench_data.check_gates(result)
    assert len(failed) == 1 and failed[0].startswith("gate data.parquet_over_jsonl: measured 0.5 < minimum 0.9")
