"""bench/bench_sandbox.py at its quick sizes: every row measured, every trivial completion passed."""

from tests.bench.scripts import bench_script

bench_sandbox = bench_script("bench_sandbox")


def test_quick_run_measures_every_row():
    result = bench_sandbox.run("cpu", quick=True)
    assert {(r["isolation"], r["workers"]) for r in result["rows"]} >= {("auto", 1), ("fallback", 1)}
    for row in result["rows"]:
        assert row["all_passed"] and row["completions_per_s"] > 0 and row["cpu_ms_per_completion"] > 0
    assert bench_sandbox.check_gates(result) is None
    table = bench_sandbox.table(result)
    assert "CPU ms each" in table and "auto: " in table and "landlock-fs" in table
