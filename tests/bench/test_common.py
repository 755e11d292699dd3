"""bench/common.py: device names, tables, gates, interleaved timing, the scripts' main(), and the results
files: one scheme, bench/results/<device>/<name>.<ext>, and every results file the README cites exists."""

import json
import os
import re

import pytest
import torch

from mftcore.commands.bench import BENCHMARKS
from tests.bench.scripts import BENCH, bench_script
from tests.helpers.paths import ROOT

common = bench_script("common")
GATES = common.load_gates()


def test_device_names_and_tables():
    assert common.slug("NVIDIA H200") == "nvidia-h200"
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.slug("Intel(R) Xeon(R) Processor") == "intel-r-xeon-r-processor"
    cpu = common.device_slug("cpu")
    assert cpu.startswith("cpu-") and cpu.endswith(f"-{os.cpu_count()}cores") and cpu == common.slug(cpu)
    table = common.format_table([{"impl": "a", "ms": 1.23456, "x": {"y": 2}, "l": [1]}, {"impl": "bb", "ms": 10.0}])
    lines = table.splitlines()
    assert lines[0].split() == ["impl", "ms", "x.y"] and lines[1].split() == ["a", "1.235", "2"]
    assert lines[2].split() == ["bb", "10"] and len({len(line) for line in lines}) == 1  # aligned


@pytest.mark.parametrize("measured, expected", [(49.9, 1), (50.0, 0), (float("nan"), 1)])
def test_a_missed_gate_names_itself_and_the_ratio(measured, expected):
    failed = common.gate_failures("packing", {"speedup_vs_python_bfd": measured, "speedup_vs_python_next_fit": 8.0,
                                              "fill_bfd": 0.9999}, GATES)
    assert len(failed) == expected
    if failed:
        assert failed[0].startswith(f"gate packing.speedup_vs_python_bfd: measured {measured:.4g} < minimum 50")


def test_the_ci_floor_applies_only_where_asked_and_where_a_gate_has_one():
    ci_min, gate_min = GATES["data"]["parquet_over_jsonl"]["ci_min"], GATES["data"]["parquet_over_jsonl"]["min"]
    between = {"parquet_over_jsonl": (ci_min + gate_min) / 2}
    assert ci_min < gate_min and len(common.gate_failures("data", between, GATES)) == 1
    assert common.gate_failures("data", between, GATES, floor="ci_min") == []
    failed = common.gate_failures("data", {"parquet_over_jsonl": ci_min - 0.01}, GATES, floor="ci_min")
    assert len(failed) == 1 and f"< minimum {ci_min:g}" in failed[0]
    # a gate without ci_min keeps its min under the CI floor
    assert len(common.gate_failures("packing", {"speedup_vs_python_bfd": 49.0, "speedup_vs_python_next_fit": 8.0,
                                                "fill_bfd": 0.9999}, GATES, floor="ci_min")) == 1


def test_every_gate_has_a_minimum_what_and_measured():
    for section, gates in GATES.items():
        if section.startswith("_"):
            continue
        for key, gate in gates.items():
            if not key.startswith("_"):
                assert isinstance(gate["min"], float) and gate["what"] and gate["measured"], (section, key)


def test_interleaved_timing_alternates_and_keeps_the_fastest_call():
    order = []
    durations = {"a": iter([5, 1, 7]), "b": iter([4, 3, 9, 2, 6, 8])}
    now = [0.0]

    def clock():  # a fake clock that each call moves forward by its next duration
        return now[0]

    def call(name):
        def fn():
            order.append(name)
            now[0] += next(durations[name])
            return len(order)
        return fn

    t = common.time_interleaved({"a": call("a"), "b": call("b")}, rounds=3, clock=clock, back_to_back={"b": 2})
    assert order == ["a", "b", "b"] * 3
    assert t.runs == {"a": [5, 1, 7], "b": [4, 3, 9, 2, 6, 8]} and t.best == {"a": 1, "b": 2}
    assert t.outputs == {"a": 7, "b": 9}


def test_interleaved_timing_goes_on_while_the_test_fails_up_to_max_rounds():
    durations = iter([9, 8, 7, 6, 5, 4, 3, 2, 1])
    now = [0.0]

    def call():
        now[0] += next(durations)

    seen = []

    def until(best):
        seen.append(best["x"])
        return best["x"] <= 6

    t = common.time_interleaved({"x": call}, rounds=2, clock=lambda: now[0], until=until, max_rounds=6)
    assert t.runs["x"] == [9, 8, 7, 6] and seen == [8, 7, 6]  # checked after the first 2 rounds, then each
    t = common.time_interleaved({"x": call}, rounds=1, clock=lambda: now[0], until=lambda best: False, max_rounds=3)
    assert t.runs["x"] == [5, 4, 3]  # never true: stops at max_rounds


def test_the_cpu_clocks_leave_out_time_spent_waiting():
    t = common.time_interleaved({"sleep": lambda: __import__("time").sleep(0.2)}, 1, "thread")
    assert t.best["sleep"] < 0.05  # a thread that waits uses no CPU; wall time would say 0.2 s
    assert set(common.CLOCKS) == {"wall", "thread", "process"}


def fake_script(tmp_path, argv, gates=None, result=None):
    """common.run_script with a run() that measures nothing: the plumbing of every script's main()."""
    result = result or {"device": "cpu-test", "ratio": 2.0}
    return common.run_script("fake", lambda device, quick: {**result, "ran_on": device, "quick": quick},
                             lambda r: f"table of {r['ratio']}", lambda r: gates,
                             ["--results-dir", str(tmp_path), *argv])


def test_a_script_writes_its_results_under_its_device_and_exits_1_on_a_failed_gate(tmp_path, capsys):
    assert fake_script(tmp_path, ["--device", "cpu"], gates=[]) == 0
    out = capsys.readouterr().out
    assert "table of 2.0" in out and "gates: all pass" in out
    record = json.loads((tmp_path / "cpu-test" / "fake.json").read_text())
    assert record == {"device": "cpu-test", "ratio": 2.0, "ran_on": "cpu", "quick": False, "gates_failed": []}
    assert fake_script(tmp_path, ["--device", "cpu"], gates=["gate s.k: measured 1 < minimum 2 (x)"]) == 1
    assert "gates: FAILED: gate s.k: measured 1 < minimum 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "cpu-test" / "fake.json").read_text())["gates_failed"]
    assert fake_script(tmp_path, ["--device", "cpu"], gates=None) == 0
    assert "gates: none for this benchmark on cpu" in capsys.readouterr().out


def test_a_quick_run_checks_no_gate_and_writes_only_where_asked(tmp_path, capsys):
    assert fake_script(tmp_path / "r", ["--quick", "--device", "cpu"], gates=["would fail"]) == 0
    assert "gates: not checked with --quick" in capsys.readouterr().out and not (tmp_path / "r").exists()
    assert fake_script(tmp_path / "r", ["--quick", "--device", "cpu", "--json", str(tmp_path / "q.json")]) == 0
    assert json.loads((tmp_path / "q.json").read_text())["quick"] is True


def test_a_script_asked_for_a_missing_gpu_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fake_script(tmp_path, ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bench fake: error: --device cuda: torch sees no CUDA device here"
    assert fake_script(tmp_path, ["--device", "auto", "--quick"]) == 0  # auto: the CPU
    assert "measuring on cpu" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- results files
RESULT_NAMES = set(BENCHMARKS) | {"gpu_check", "gpu_check_dry_run"}


def results_files() -> list:
    root = os.path.join(BENCH, "results")
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_results_follow_one_scheme():
    """bench/results/<device>/<bench>.json (a benchmark's or gpu_check's run) or compile-<targets>/<op>.txt|md."""
    files = results_files()
    assert files, "no committed results"
    for rel in files:
        parts = rel.split(os.sep)
        assert len(parts) == 2 and parts[0] == common.slug(parts[0]), rel
        name, ext = os.path.splitext(parts[1])
        if parts[0].startswith("compile-"):
            assert ext in (".txt", ".md") and name in BENCHMARKS, rel
        else:
            assert ext == ".json" and name in RESULT_NAMES, rel
            with open(os.path.join(BENCH, "results", rel), encoding="utf-8") as f:
                assert isinstance(json.load(f), dict), rel


def test_every_results_file_the_readme_and_gates_cite_exists():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(common.GATES, encoding="utf-8") as f:
        gates = f.read()
    cited = set(re.findall(r"bench/results/[\w./-]+\w", readme + gates))
    assert cited, "the README cites no results file"
    assert [c for c in cited if not os.path.exists(os.path.join(ROOT, c))] == []
    assert {f"bench/results/{rel}" for rel in results_files()} <= set(re.findall(r"bench/results/[\w./-]+\w", readme))
