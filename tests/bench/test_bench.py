"""`mftcore bench`, the end-to-end train-step benchmark, and bench/gpu_check.py's plumbing, on the CPU.

gpu_check.py runs here with --dry-run (tiny shapes, CPU paths): the same stages, records and results file
as on a GPU, so what a GPU session will run is exercised in CI. The gates themselves: test_gates.py.
"""

import json
import os
import time

import pytest
import torch

from tests.helpers.paths import ROOT
from mftcore.benchmarks import device_slug, format_table, load_bench_module, slug
from mftcore.cli import main

train_step = load_bench_module("bench_train_step")
gpu_check = load_bench_module("gpu_check")
MICRO_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


@pytest.fixture
def one_thread():
    """Tiny models on the shared 2-core machine: a second torch thread mostly waits for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_both_modes_train_the_same_tokens_to_the_same_losses(one_thread):
    """With lr=0 the weights never move, so packed+fused and padded+eager must see the same documents and
    give the same per-task loss sums: the benchmark compares the same work, only laid out differently."""
    samples = train_step.synthetic_samples(20, 96, vocab_size=97, num_tasks=3, seed=1, mean=40)
    result = train_step.compare(MICRO_LLAMA, samples, vocab_size=97, pad_id=0, seq_length=96, batch_size=3,
                                num_tasks=3, warmup_steps=1, lr=0.0)
    packed, padded = result["rows"]
    assert [packed["mode"], padded["mode"]] == ["packed_fused", "padded_eager"]
    assert result["same_tokens"] and packed["tokens"] == sum(len(s.input_ids) for s in samples)
    torch.testing.assert_close(torch.tensor(packed["task_loss_sum"]), torch.tensor(padded["task_loss_sum"]),
                               rtol=1e-4, atol=1e-4)
    assert packed["steps"] < padded["steps"] and packed["padding_fraction"] < padded["padding_fraction"]
    assert result["speedup"] == pytest.approx(packed["tokens_per_s"] / padded["tokens_per_s"])


def test_synthetic_samples_look_like_chat_data():
    samples = train_step.synthetic_samples(200, 4096, vocab_size=1000, seed=0)
    lengths = [len(s.input_ids) for s in samples]
    assert min(lengths) >= 16 and max(lengths) <= 4096 and 400 < sum(lengths) / len(lengths) < 900
    for s in samples[:20]:  # a prompt without loss, then the answer with loss
        assert s.loss_mask[0] == 0 and s.loss_mask[-1] == 1 and 0.3 <= 1 - s.loss_mask.mean() <= 0.61
    assert {s.task_id for s in samples} == {0, 1, 2}


def test_bench_train_step_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "train_step.json"
    assert main(["bench", "train_step", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "packed_fused" in text and "padded_eager" in text and "tokens_per_s" in text
    assert "x trained tokens/s" in text and "gates: not checked with --quick" in text
    record = json.loads(out.read_text())
    assert record["same_tokens"] and record["threads"] == 1 and record["device"] == device_slug("cpu")
    assert [r["mode"] for r in record["rows"]] == ["packed_fused", "padded_eager"]


def test_bench_packing_and_cross_entropy_print_their_tables(capsys):
    assert main(["bench", "packing", "--quick"]) == 0
    text = capsys.readouterr().out
    assert "C++ BFD" in text and "vs a plain per-sample Python loop" in text and "same ids: True" in text
    assert main(["bench", "cross_entropy", "--quick", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "peak_extra_mb" in text and "mftcore" in text and "naive / chunked peak memory" in text


def test_a_benchmark_this_build_lacks_says_so(tmp_path, monkeypatch, capsys):
    """Until issue 5 is merged there is no bench_varlen_attention.py: the command says so, measures nothing."""
    (tmp_path / "gates.json").write_text("{}")
    monkeypatch.setenv("MFTCORE_BENCH_DIR", str(tmp_path))
    assert main(["bench", "varlen_attention"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mftcore: error: bench varlen_attention: not available in this build")
    assert "bench_varlen_attention.py" in err and len(err.splitlines()) == 1


def test_bench_without_a_checkout_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MFTCORE_BENCH_DIR", str(tmp_path / "nowhere"))
    assert main(["bench", "packing"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no benchmarks here" in err and "MFTCORE_BENCH_DIR" in err and len(err.splitlines()) == 1


def test_results_names_and_tables():
    assert slug("NVIDIA H200") == "nvidia-h200" and slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("cpu").startswith("cpu-") and device_slug("cpu").endswith(f"-{os.cpu_count()}cores")
    table = format_table([{"impl": "a", "ms": 1.23456, "x": {"y": 2}}, {"impl": "bb", "ms": 10.0}]).splitlines()
    assert table[0].split() == ["impl", "ms", "x.y"] and table[1].split() == ["a", "1.235", "2"]
    assert len({len(line) for line in table}) == 1  # aligned


def test_gpu_check_dry_run_runs_every_stage_and_writes_the_results(tmp_path):
    rc = gpu_check.main(["--dry-run", "--results-dir", str(tmp_path), "--pytest-args",
                         "tests/bench/test_bench_cross_entropy.py"])
    path = tmp_path / f"dry-run-{device_slug('cpu')}.json"
    record = json.loads(path.read_text())
    stages = {s["stage"]: s for s in record["stages"]}
    assert rc == 0, [s for s in record["stages"] if s["status"] not in ("ok", "skipped")]
    assert list(stages)[:2] == ["environment", "pytest_gpu"]
    assert [f"{c.module}.{c.function}" for c in gpu_check.CHECKS] == list(stages)[2:]
    assert stages["environment"]["result"]["extension"] == "mftcore._packing imported"
    assert stages["pytest_gpu"]["result"]["skipped"] >= 1  # the GPU-marked test, collected and skipped here
    assert stages["bench_cross_entropy.gpu_correctness"]["result"]["ok"]
    assert stages["bench_train_step.gpu_benchmarks"]["result"]["same_tokens"]
    for s in record["stages"]:
        assert s["status"] == "ok" or (s["status"] == "skipped" and s["reason"]), s


def test_gpu_check_records_failures_timeouts_and_the_budget(tmp_path):
    run = gpu_check.Run(str(tmp_path / "r.json"), budget_s=60, dry_run=True)
    assert run.stage("fine", 0, lambda: {"x": 1})["status"] == "ok"
    assert run.stage("wrong", 0, lambda: {"ok": False})["status"] == "failed"
    broken = run.stage("broken", 0, lambda: 1 / 0)
    assert broken["status"] == "error" and broken["error"].startswith("ZeroDivisionError")
    run.budget_s = time.perf_counter() - run.t0 + 1.0  # one second left
    assert run.stage("too long", 0, lambda: time.sleep(30) or {})["status"] == "timeout"
    assert run.stage("no time left", 0.5, lambda: {})["status"] == "skipped"
    saved = json.loads((tmp_path / "r.json").read_text())  # rewritten after every stage
    assert [s["status"] for s in saved["stages"]] == ["ok", "failed", "error", "timeout", "skipped"]
    lines = gpu_check.summary_lines(saved)
    assert len(lines) == 6 and "ZeroDivisionError" in lines[3]


def test_junit_summary_counts_and_names_failures(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a"/>'
                   '<testcase classname="t" name="b"><failure message="boom"/></testcase>'
                   '<testcase classname="t" name="c"><skipped message="no cuda"/></testcase></testsuite></testsuites>')
    summary = gpu_check.junit_summary(str(xml))
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 1, 1)
    assert summary["failures"] == [{"test": "t::b", "message": "boom"}]


def test_gpu_check_needs_cuda_unless_dry_run(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--results-dir", os.path.join(ROOT, "nonexistent")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
