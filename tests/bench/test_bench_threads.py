"""bench/bench_threads.py: one quick run measures both thread counts on the same steps, restores torch's
thread count, and prints its table (the numbers themselves: bench/results/<cpu>/threads.json)."""

import torch

from tests.bench.scripts import bench_script

bench_threads = bench_script("bench_threads")


def test_quick_run_measures_both_counts_and_restores_threads(tmp_path, capfd):
    before = torch.get_num_threads()
    out = tmp_path / "threads.json"
    assert bench_threads.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    assert torch.get_num_threads() == before
    import json

    result = json.loads(out.read_text())
    assert result["steps_per_s_1_threads"] > 0 and result["steps_per_s_2_threads"] > 0
    assert result["one_over_two_threads"] == result["steps_per_s_1_threads"] / result["steps_per_s_2_threads"]
    text = capfd.readouterr().out
    assert "1 thread / 2 threads = " in text and "steps/s" in text


def test_table_reads_the_result():
    result = {"steps_per_s_1_threads": 4.0, "steps_per_s_2_threads": 1.0, "one_over_two_threads": 4.0,
              "clock": "wall", "rounds": 3, "steps_per_call": 8, "torch_default_threads": 2}
    text = bench_threads.table(result)
    assert "4.00x" in text and "4.00" in text and "1.00" in text and bench_threads.check_gates(result) is None
