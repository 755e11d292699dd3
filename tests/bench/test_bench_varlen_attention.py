"""Varlen attention options on CPU: each option's cost over the plain op under pytest-benchmark (the CPU
path, i.e. the PyTorch reference: explicit masks, so a window costs the same as causal here; the kernels'
block skipping is measured in the interpreter, tests/kernels/varlen_attention_cases.py, and on a GPU by
bench_varlen_attention.gpu_options), and the GPU options benchmark's plumbing with tiny shapes."""

import time

import pytest
import torch

from tests.bench.scripts import bench_script

bench = bench_script("bench_varlen_attention")
LENGTHS = [40, 130, 7, 75]  # 252 tokens, documents longer and shorter than the windows below
OPTIONS = {"plain": {}, "window_16": dict(window_size=(15, 0)), "softcap": dict(softcap=20.0),
           "return_lse": dict(return_lse=True), "q_half_of_k": "q_half_of_k"}


@pytest.fixture(scope="module")
def inputs():
    q, k, v, do = bench.random_inputs(LENGTHS, (4, 2), 32, torch.float32, "cpu")
    return q, k, v, do


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_cost_on_cpu(benchmark, inputs, name):
    """Forward + backward of one option on the reference path (3 rounds; compare the rows of one run)."""
    q, k, v, do = inputs
    cu, max_len = bench.cu_seqlens_of(LENGTHS, "cpu"), max(LENGTHS)
    options = OPTIONS[name]
    if options == "q_half_of_k":
        case = bench.option_cases(LENGTHS, "cpu")["q_half_of_k"]
        rows = case.pop("q_rows")
        q, do, cu, max_len, options = q[rows], do[rows], case.pop("cu"), case.pop("max_len"), case

    def step():
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        out = bench.varlen_attention(qg, kg, vg, cu, max_len, **options)
        o = out[0] if options.get("return_lse") else out
        return torch.autograd.grad(o, (qg, kg, vg), do)

    grads = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    assert all(g.isfinite().all() for g in grads)


def test_pairs_kept_by_each_option():
    assert bench.option_tokens_seen([4], "causal") == 10
    assert bench.option_tokens_seen([4], "window_2") == 1 + 2 + 2 + 2
    assert bench.option_tokens_seen([5], "q_half_of_k") == 3 + 4 + 5  # queries 2-4 of 5
    cases = bench.option_cases([5, 3], "cpu")
    assert cases["q_half_of_k"]["q_rows"].tolist() == [2, 3, 4, 6, 7]
    assert cases["q_half_of_k"]["cu"].tolist() == [0, 3, 5] and cases["q_half_of_k"]["max_len"] == 3


def test_options_benchmark_report_on_cpu():
    def wall_ms(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    result = bench.options_benchmarks("cpu", total=256, heads=(2, 1), head_dim=16, lengths_range=(32, 128),
                                      dtype=torch.float32, timer=wall_ms)
    assert [r["option"] for r in result["options"]] == list(bench.option_cases([4], "cpu"))
    assert result["options"][0]["fwd+bwd_vs_causal"] == pytest.approx(1.0)
    assert {"gate_window_256_cheaper_than_causal", "gate_softcap_50_within_5pct"} <= set(result)
