"""`mftcore bench` (a runner of bench/bench_NAME.py), the end-to-end train-step benchmark, and
bench/gpu_check.py's plumbing, on the CPU.

gpu_check.py runs here with --dry-run (tiny shapes, CPU paths): the same stages, records and results file
as on a GPU, so what a GPU session will run is exercised in CI. The gates themselves: test_gates.py;
the shared helpers of bench/common.py: test_common.py.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from mftcore.cli import main
from mftcore.commands.bench import BENCHMARKS
from tests.bench.scripts import BENCH, bench_script
from tests.helpers.paths import ROOT

common = bench_script("common")
train_step = bench_script("bench_train_step")
gpu_check = bench_script("gpu_check")
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


# ------------------------------------------------------------------ mftcore bench: the scripts, run by the CLI
def test_bench_train_step_prints_a_table_and_writes_json(tmp_path, capfd):
    out = tmp_path / "train_step.json"
    assert main(["bench", "train_step", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    text = capfd.readouterr().out
    assert "packed_fused" in text and "padded_eager" in text and "tokens_per_s" in text
    assert "x trained tokens/s" in text and "gates: not checked with --quick" in text
    record = json.loads(out.read_text())
    assert record["same_tokens"] and record["threads"] == 1 and record["device"] == common.device_slug("cpu")
    assert [r["mode"] for r in record["rows"]] == ["packed_fused", "padded_eager"]


def test_bench_packing_and_cross_entropy_print_their_tables(capfd):
    assert main(["bench", "packing", "--quick"]) == 0
    text = capfd.readouterr().out
    assert "C++ BFD" in text and "vs a plain per-sample Python loop" in text and "same ids: True" in text
    assert main(["bench", "cross_entropy", "--quick", "--device", "cpu"]) == 0
    text = capfd.readouterr().out
    assert "peak_extra_mb" in text and "mftcore" in text and "naive / chunked peak memory" in text


def test_the_command_runs_the_script_with_the_standard_flags_and_returns_its_exit_code(tmp_path, monkeypatch, capfd):
    """The command knows no script's internals: it passes --device/--quick/--json and hands back the exit code."""
    (tmp_path / "common.py").write_text("")
    (tmp_path / "bench_packing.py").write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\nsys.exit(3)\n")
    monkeypatch.setenv("MFTCORE_BENCH_DIR", str(tmp_path))
    assert main(["bench", "packing", "--quick", "--json", "out.json"]) == 3
    assert json.loads(capfd.readouterr().out) == ["--device", "auto", "--quick", "--json", "out.json"]
    assert main(["bench", "packing", "--device", "cpu"]) == 3
    assert json.loads(capfd.readouterr().out) == ["--device", "cpu"]


def test_a_benchmark_this_build_lacks_says_so(tmp_path, monkeypatch, capfd):
    """A checkout whose bench/ lacks bench_varlen_attention.py: the command says so in one line, runs nothing."""
    (tmp_path / "common.py").write_text("")
    monkeypatch.setenv("MFTCORE_BENCH_DIR", str(tmp_path))
    assert main(["bench", "varlen_attention"]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("mftcore: error: bench varlen_attention: not available in this build")
    assert "bench_varlen_attention.py" in err and len(err.splitlines()) == 1


def test_bench_without_a_checkout_is_a_one_line_error(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MFTCORE_BENCH_DIR", str(tmp_path / "nowhere"))
    assert main(["bench", "packing"]) == 2
    err = capfd.readouterr().err.strip()
    assert "no benchmarks here" in err and "MFTCORE_BENCH_DIR" in err and len(err.splitlines()) == 1


def test_the_command_knows_every_script_of_the_checkout():
    scripts = sorted(f[len("bench_"):-len(".py")] for f in os.listdir(BENCH) if f.startswith("bench_")
                     and f.endswith(".py"))
    assert scripts == sorted(BENCHMARKS)
    for name in BENCHMARKS:  # each is a script as common.run_script expects
        module = bench_script(f"bench_{name}")
        assert all(callable(getattr(module, f, None)) for f in ("run", "table", "check_gates", "main")), name


@pytest.mark.parametrize("name", ["cross_entropy", "varlen_attention", "train_step"])
def test_a_gpu_run_is_filed_under_the_device_slug(name, monkeypatch):
    """What a GPU function records as "device" (varlen's: the CUDA name) must not become the directory name."""
    module = bench_script(f"bench_{name}")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(module, "gpu_benchmarks", lambda **kwargs: {"device": "NVIDIA H200", "kwargs": kwargs})
    result = module.run("cuda", quick=True)
    assert result["device"] == "nvidia-h200" and result["device_name"] == "NVIDIA H200" and result["kwargs"]


def test_the_tables_of_gpu_results_print(one_thread):
    """The GPU branch of each table(), on results shaped as the GPU functions return them (run on the CPU
    where they can: no CI machine has a GPU)."""
    ce = bench_script("bench_cross_entropy")
    result = ce.gpu_benchmarks("cpu", shape=(64, 32, 100), dtype=torch.float32, timer=gpu_check.cpu_timer, peak=None,
                               sweep=False)
    text = ce.table({**result, "device": "nvidia-h200"})
    assert "N=64 H=32 V=100 float32" in text and "effective_tflops" in text and "tflops(6NHV)>=600" in text
    va = bench_script("bench_varlen_attention")
    row = {"total_tokens": 8192, "documents": 5, "max_len": 4096, "fwd_vs_varlen_attn": 0.95,
           "backends": {"mftcore": {"fwd_ms": 1.0, "bwd_ms": 2.0}, "flex": {"error": "RuntimeError: x"}}}
    text = va.table({"device": "nvidia-h200", "shapes": [row]})
    assert "backends.mftcore.fwd_ms" in text and "backends.flex.error" in text and "0.95" in text
    samples = train_step.synthetic_samples(8, 64, vocab_size=97, seed=0, mean=30)
    result = train_step.compare(MICRO_LLAMA, samples, vocab_size=97, pad_id=0, seq_length=64, batch_size=2,
                                num_tasks=3, warmup_steps=0)
    text = train_step.table({**result, "device": "nvidia-h200", "model": {**MICRO_LLAMA, "vocab_size": 97}})
    assert text.startswith("train step, 2-layer Llama, bf16") and "x trained tokens/s" in text


def test_bench_scripts_run_as_scripts_from_anywhere(tmp_path):
    """`python bench/bench_<name>.py --help` from another directory: the script finds its neighbour common.py."""
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_varlen_attention.py"), "--help"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--device {auto,cpu,cuda}" in proc.stdout and "--quick" in proc.stdout and "--json PATH" in proc.stdout


# ---------------------------------------------------------------------------------------------- gpu_check
def test_gpu_check_dry_run_runs_every_stage_and_writes_the_results(tmp_path):
    rc = gpu_check.main(["--dry-run", "--results-dir", str(tmp_path), "--pytest-args",
                         "tests/bench/test_bench_cross_entropy.py"])
    path = tmp_path / common.device_slug("cpu") / "gpu_check_dry_run.json"
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


def test_gpu_check_writes_under_the_results_scheme(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert gpu_check.results_path(str(tmp_path), dry_run=False) == str(tmp_path / "nvidia-h200" / "gpu_check.json")


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
