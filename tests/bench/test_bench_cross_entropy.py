"""The GPU benchmark's helpers, run on CPU with tiny shapes: what bench/gpu_check.py will call must work."""

import time

import pytest
import torch

from tests.bench.scripts import bench_script

bench = bench_script("bench_cross_entropy")


def wall_timer(fn, grad_to_none):
    for t in grad_to_none:
        t.grad = None
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def test_effective_tflops_counts_8nhv():
    n, h, v = bench.GOAL_SHAPE
    assert bench.effective_tflops(n, h, v, 100.0) == pytest.approx(8 * n * h * v / 0.1 / 1e12)
    assert bench.effective_tflops(n, h, v, 100.0) == pytest.approx(688.8, rel=1e-3)


def test_goal_tflops_counts_6nhv():
    n, h, v = bench.GOAL_SHAPE
    assert bench.goal_tflops(n, h, v, 100.0) == pytest.approx(0.75 * bench.effective_tflops(n, h, v, 100.0))


def test_eager_baseline_is_the_same_loss():
    hidden, weight, _, labels, tasks = bench.make_inputs(50, 16, 70, torch.float64, "cpu")
    assert bench.eager_loss(hidden, weight, labels, tasks).item() == pytest.approx(
        bench.ours_loss(hidden, weight, labels, tasks).item(), rel=1e-6)


def test_correctness_report_on_cpu():
    result = bench.gpu_correctness("cpu", dtypes=(torch.bfloat16, torch.float16), cases=[(33, 48, 77, True)])
    assert result["ok"] and len(result["cases"]) == 2 * (4 + 5) and not result["triton_path"]
    assert {c["reduction"] for c in result["cases"]} == {"token_mean", "task_mean", "sum", "none"}
    assert {"loss_err", "grad_hidden_err", "grad_weight_err", "grad_bias_err"} <= set(result["cases"][0])


def test_benchmark_report_on_cpu():
    result = bench.gpu_benchmarks("cpu", shape=(64, 32, 100), dtype=torch.float32, timer=wall_timer, peak=None,
                                  sweep=False)
    assert [r["impl"] for r in result["rows"]][:2] == ["mftcore", "eager"]
    assert result["speedup_vs_eager"] > 0 and set(result["goals"]) >= {"tflops(6NHV)>=600"}
    assert result["rows"][0]["tflops_6nhv"] == pytest.approx(0.75 * result["rows"][0]["effective_tflops"])


def test_the_report_names_the_choices_and_times_each_path(monkeypatch):
    """On CPU nothing tunes; with a record installed as a GPU run would leave it, each path's best plan is
    forced in turn (the plans are restored) and the table prints the choice and why."""
    from mftcore.kernels import autotune
    from mftcore.kernels import cross_entropy_kernels as cek

    result = bench.gpu_benchmarks("cpu", shape=(64, 32, 100), dtype=torch.float32, timer=wall_timer, peak=None)
    assert result["tuning"] == [] and result["paths"] == [] and "nothing tuned" in bench.table(result)
    triton, cublas = cek.TRITON_CANDIDATES["sm90_16bit"][0], cek.CUBLAS_CANDIDATES[0]
    rec = autotune.Record("cross_entropy", {"device": "nvidia-h200-sm90", "grad": 1}, autotune.as_dict(cublas),
                          [[autotune.as_dict(triton), 2.0], [autotune.as_dict(cublas), 1.0]], "measured")
    autotune.reset()
    autotune.install({"x": vars(rec)}, on_miss="measure")
    try:
        default = cek.default_plan
        paths = bench.time_each_path((64, 32, 100), torch.float32, "cpu", wall_timer)
        assert [p["path"] for p in paths] == ["cublas", "triton"] and cek.default_plan is default
        text = bench.table({**result, "tuning": bench.tuning_report(), "paths": paths})
        assert "fastest of 2: 1 ms" in text and "each logits path's best plan" in text
    finally:
        autotune.reset()


def test_option_benchmark_report_on_cpu():
    result = bench.gpu_option_benchmarks("cpu", shape=(64, 32, 100), dtype=torch.float32, timer=wall_timer, peak=None)
    assert [r["impl"] for r in result["rows"]] == list(bench.OPTION_CASES)
    assert result["rows"][0]["cost_over_plain"] == 0 and all("cost_over_plain" in r for r in result["rows"])


# Each option's cost over the plain op on the CPU path, under pytest-benchmark (its table in the test
# output; tiny rounds: the suite runs them). fp32, N, H, V = 512, 128, 2000.
CPU_OPTION_SHAPE = (512, 128, 2000)


def option_step(name):
    n, h, v = CPU_OPTION_SHAPE
    hidden, weight, _, labels, tasks = bench.make_inputs(n, h, v, torch.float32, "cpu")
    hidden.requires_grad_()
    weight.requires_grad_()
    loss_fn = bench.option_loss(name)

    def step():
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, labels, tasks).backward()

    return step


@pytest.mark.parametrize("name", list(bench.OPTION_CASES))
def test_cpu_option_cost_under_pytest_benchmark(benchmark, name):
    benchmark.group = "cross_entropy options, CPU fp32 fwd+bwd N,H,V=512,128,2000"
    benchmark.pedantic(option_step(name), rounds=5, iterations=1, warmup_rounds=1)


def test_cpu_options_cost_a_bounded_multiple_of_the_plain_op():
    """CPU time (process_time, not wall time: the machine is shared), best of 5 interleaved: no option costs
    more than 3x the plain op on the CPU path (measured about 1.0-1.6x; softcap adds a tanh and a second
    [C, V] buffer, "none" the backward's second pass)."""
    steps = {name: option_step(name) for name in bench.OPTION_CASES}
    best = {name: float("inf") for name in steps}
    for _ in range(5):
        for name, step in steps.items():
            t0 = time.process_time()
            step()
            best[name] = min(best[name], time.process_time() - t0)
    ratios = {name: best[name] / best["plain"] for name in steps}
    assert all(r < 3.0 for r in ratios.values()), ratios


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.py runs it)")
def test_gpu_correctness_bf16_fp16():
    result = bench.gpu_correctness()
    assert result["triton_path"] and result["ok"], [c for c in result["cases"] if not c["ok"]]
