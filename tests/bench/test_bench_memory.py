"""bench/bench_memory.py: one quick run (configs/tiny.json, 1 step, a `mftcore train` child per case) gives
the four cases with their peak RSS and memory.json breakdowns, and LoRA saves no more for backward than
full fine-tuning, while with its switch off (peft's own path) it saves more. No RSS thresholds: the
machine is shared and RSS moves with the allocator (the numbers: bench/results/<cpu>/memory.json)."""

import json

import pytest

from tests.bench.scripts import bench_script

bench_memory = bench_script("bench_memory")
BREAKDOWN = {"weights_gb", "gradients_gb", "optimizer_state_gb", "activations_gb", "peak_gb", "device", "method"}


@pytest.mark.slow  # four `mftcore train` children, ~10 s each on the shared machine
def test_quick_run_measures_every_case(tmp_path, capfd):
    out = tmp_path / "memory.json"
    assert bench_memory.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "configs/tiny.json" and result["steps"] == 1
    cases = {(c["method"], c["fixes"]): c for c in result["cases"]}
    assert set(cases) == {("lora", "on"), ("full", "on"), ("lora", "off"), ("full", "off")}
    for case in cases.values():
        assert case["peak_rss_gb"] > 0 and set(case["memory"]) == BREAKDOWN and case["memory"]["device"] == "cpu"
    saved = {key: c["memory"]["activations_gb"] for key, c in cases.items()}
    assert 0 < saved["lora", "on"] <= saved["full", "on"]
    assert saved["lora", "off"] > saved["lora", "on"]  # the switch reaches the child: peft's path saves more
    assert saved["full", "off"] == saved["full", "on"]  # full FT has no LoRA; the malloc switch moves no tensor
    lora, full = cases["lora", "on"]["memory"], cases["full", "on"]["memory"]
    assert lora["optimizer_state_gb"] < full["optimizer_state_gb"] and lora["gradients_gb"] < full["gradients_gb"]
    rss = {key: c["peak_rss_gb"] for key, c in cases.items()}
    assert result["lora_over_full_rss_fixes_on"] == rss["lora", "on"] / rss["full", "on"]
    text = capfd.readouterr()
    assert "LoRA / full peak RSS: fixes on " in text.out and "peak RSS GB" in text.out
    assert "SmolLM2-135M-Instruct not used (--quick)" in text.err and "(4/4)" in text.err


def test_switches_turn_the_fixes_off(monkeypatch):
    from mftcore.memory import fix_host_malloc

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MFTCORE_HOST_MALLOC_FIX", "0")
    assert fix_host_malloc() is False
    monkeypatch.setenv("MFTCORE_HOST_MALLOC_FIX", "1")
    assert fix_host_malloc() is True  # glibc on the CI machine


def test_failed_case_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_memory, "overrides", lambda *a: ["no_such_key=1"])
    with pytest.raises(SystemExit) as e:
        bench_memory.run_case("full", "on", str(tmp_path), False, 1, str(tmp_path))
    assert str(e.value).startswith("bench memory: full, fixes on: mftcore train exited ") and "\n" not in str(e.value)


def test_table_reads_the_result():
    memory = {"weights_gb": 0.5, "gradients_gb": 0.5, "optimizer_state_gb": 1.0, "activations_gb": 0.25,
              "peak_gb": 2.0, "device": "cpu", "method": "m"}
    cases = [{"method": m, "fixes": f, "peak_rss_gb": 3.0 if m == "full" else 1.5, "memory": memory}
             for m, f in bench_memory.CASES]
    result = {"setup": "s", "cases": cases, "lora_over_full_rss_fixes_on": 0.5, "lora_over_full_rss_fixes_off": 0.5}
    text = bench_memory.table(result)
    assert text.count("\n") == 6 and "0.50x" in text and "1.5" in text and bench_memory.check_gates(result) is None
