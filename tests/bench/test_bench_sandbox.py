"""bench/bench_sandbox.py at its quick sizes: every row measured, every trivial completion passed."""

from mftcore.sandbox import check_platform
from tests.bench.scripts import bench_script

bench_sandbox = bench_script("bench_sandbox")


def test_quick_run_measures_every_row():
    result = bench_sandbox.run("cpu", quick=True)
    measured = {(r["isolation"], r["workers"]) for r in result["rows"]}
    assert ("auto", 1) in measured and (("fallback", 1) in measured) != ("fallback" in result["refused"])
    for row in result["rows"]:
        assert row["all_passed"] and row["completions_per_s"] > 0 and row["cpu_ms_per_completion"] > 0
    assert bench_sandbox.check_gates(result) is None
    table = bench_sandbox.table(result)
    assert "CPU ms each" in table and f"auto: {', '.join(check_platform())}" in table.splitlines()
