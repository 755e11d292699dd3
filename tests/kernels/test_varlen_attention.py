"""Varlen attention: the reference, the Triton kernels in the interpreter (a subprocess), their compilation
for sm_90/sm_80 without a GPU, the benchmark's helpers, and GPU checks (marked gpu)."""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mftcore.kernels import varlen_attention
from mftcore.kernels.dispatch import TENSOR_CORE_DTYPES, uses_triton

va = sys.modules["mftcore.kernels.varlen_attention"]  # the module; the package exports its function
from tests.helpers.paths import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_varlen_attention as bench  # noqa: E402

from tests.helpers import compile_check  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cu_of(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def dense_oracle(q, k, v, lengths, causal):
    """Attention over all T tokens with an explicit block-diagonal mask: a second, independent oracle."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= pos[:, None] >= pos[None, :]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_block_diagonal_attention(causal):
    lengths = [1, 7, 3, 12, 1]
    q, k, v = (torch.randn(24, h, 16, dtype=torch.float64) for h in (4, 2, 2))
    out = varlen_attention(q, k, v, cu_of(lengths), 12, causal=causal)  # CPU, no interpreter: the reference
    torch.testing.assert_close(out, dense_oracle(q, k, v, lengths, causal))


def test_segment_masks_are_flash_attn_s():
    """flash-attn's own examples (its README, causal with seqlen_q != seqlen_k, bottom-right aligned) and
    its sliding-window rule: query i sees keys [i + lk - lq - left, i + lk - lq + right]."""
    from mftcore.kernels.varlen_attention_reference import segment_mask, window_bounds

    assert segment_mask(2, 5, *window_bounds(True, (-1, -1)), "cpu").int().tolist() == [[1, 1, 1, 1, 0],
                                                                                       [1, 1, 1, 1, 1]]
    assert segment_mask(5, 2, *window_bounds(True, (-1, -1)), "cpu").int().tolist() == [[0, 0], [0, 0], [0, 0],
                                                                                       [1, 0], [1, 1]]
    assert segment_mask(3, 3, *window_bounds(False, (1, 0)), "cpu").int().tolist() == [[1, 0, 0], [1, 1, 0],
                                                                                      [0, 1, 1]]
    assert window_bounds(True, (3, 5)) == (3, 0) and window_bounds(False, (-1, 2)) == (-1, 2)


def dense_options_oracle(q, k, v, q_lengths, k_lengths, causal, window, softcap, scale):
    """Every option over all tokens at once, written from the definitions alone: [Tq, Tk] mask of same
    segment and r + lk - lq - left <= c <= r + lk - lq + right, capped scores, rows without keys 0."""
    qd = torch.repeat_interleave(torch.arange(len(q_lengths)), torch.tensor(q_lengths))
    kd = torch.repeat_interleave(torch.arange(len(k_lengths)), torch.tensor(k_lengths))
    r = torch.cat([torch.arange(n) for n in q_lengths])
    c = torch.cat([torch.arange(n) for n in k_lengths])
    shift = (torch.tensor(k_lengths) - torch.tensor(q_lengths))[qd]
    left, right = window[0], 0 if causal else window[1]
    mask = qd[:, None] == kd[None, :]
    if right >= 0:
        mask &= c[None, :] <= r[:, None] + shift[:, None] + right
    if left >= 0:
        mask &= c[None, :] >= r[:, None] + shift[:, None] - left
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)  # -inf where a query sees no key
    p = torch.exp(s - lse.nan_to_num(0, 0, 0)[..., None]).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v), lse.transpose(0, 1)


@pytest.mark.parametrize("case", [
    ([3, 0, 9, 6], [7, 4, 9, 2], True, (-1, -1), 0.0),
    ([3, 0, 9, 6], [7, 4, 9, 2], False, (2, 1), 3.0),
    ([12, 5], None, True, (3, -1), 0.0),
    ([12, 5], None, False, (-1, 0), 0.0),
    ([12, 5], None, True, (40, -1), 1.5),
    ([4, 8], [8, 4], False, (-1, -1), 2.0),
], ids=["qk-causal", "qk-window-softcap", "window-causal", "right-0-not-causal", "long-window-softcap", "qk-full"])
def test_reference_matches_the_dense_definition_of_every_option(case):
    """The oracle itself, in float64, against a second, independent formulation: o and lse (natural log)."""
    q_lengths, k_lengths, causal, window, softcap = case
    k_lengths = k_lengths or q_lengths
    q = torch.randn(sum(q_lengths), 4, 16, dtype=torch.float64)
    k, v = (torch.randn(sum(k_lengths), 2, 16, dtype=torch.float64) for _ in range(2))
    o, lse = varlen_attention(q, k, v, cu_of(q_lengths), max(q_lengths), causal=causal, window_size=window,
                              softcap=softcap, softmax_scale=0.3, cu_seqlens_k=cu_of(k_lengths),
                              max_seqlen_k=max(k_lengths), return_lse=True)
    want_o, want_lse = dense_options_oracle(q, k, v, q_lengths, k_lengths, causal, window, softcap, 0.3)
    torch.testing.assert_close(o, want_o)
    torch.testing.assert_close(lse, want_lse.float())
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], 4)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_backward_formulas_match_autograd(causal):
    """The backward the custom op uses on the reference path (compiled CPU or fp32 runs) against autograd
    through per-segment SDPA, in float64, GQA, a length-1 and an empty segment."""
    from mftcore.kernels.varlen_attention_reference import varlen_attention_reference_backward

    lengths = [1, 7, 0, 12, 4]
    q, k, v = (torch.randn(24, h, 16, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    do = torch.randn(24, 4, 16, dtype=torch.float64)
    cu = cu_of(lengths)
    want = torch.autograd.grad(va.varlen_attention_reference(q, k, v, cu, 12, causal=causal, softmax_scale=0.3),
                               (q, k, v), do)
    got = varlen_attention_reference_backward(do, q.detach(), k.detach(), v.detach(), cu, 12, causal=causal,
                                              softmax_scale=0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_backward_formulas_match_autograd_with_every_option(causal):
    """The same with separate q/k segments (no queries, no keys, fewer and more queries than keys), a
    window and a softcap: the tanh derivative and the rows that see no key (gradient 0)."""
    from mftcore.kernels.varlen_attention_reference import varlen_attention_reference_backward

    q_lengths, k_lengths = [3, 0, 9, 6, 2], [7, 4, 9, 2, 0]
    q = torch.randn(20, 4, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(22, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    do = torch.randn(20, 4, 16, dtype=torch.float64)
    options = dict(causal=causal, softmax_scale=0.3, cu_seqlens_k=cu_of(k_lengths), max_seqlen_k=9,
                   window_size=(3, 1), softcap=2.0)
    want = torch.autograd.grad(va.varlen_attention_reference(q, k, v, cu_of(q_lengths), 9, **options), (q, k, v), do)
    got = varlen_attention_reference_backward(do, q.detach(), k.detach(), v.detach(), cu_of(q_lengths), 9, **options)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
        assert a.isfinite().all()


def test_cpu_dispatch_is_the_reference_and_scale_applies():
    q = torch.randn(10, 2, 8)
    assert not uses_triton(q, cuda_dtypes=TENSOR_CORE_DTYPES)  # no TRITON_INTERPRET in this process
    assert not uses_triton(q.half(), cuda_dtypes=TENSOR_CORE_DTYPES)
    cu = cu_of([4, 6])
    scaled = varlen_attention(q, q, q, cu, 6, softmax_scale=0.3)
    torch.testing.assert_close(scaled, varlen_attention(q * 0.3 / 8 ** -0.5, q, q, cu, 6))


@pytest.mark.parametrize("args, message", [
    (dict(k=torch.randn(10, 3, 8), v=torch.randn(10, 3, 8)), "multiple of key/value heads"),
    (dict(q=torch.randn(10, 2, 300), k=torch.randn(10, 2, 300), v=torch.randn(10, 2, 300)), "head dim 300"),
    (dict(v=torch.randn(10, 2, 8).half()), "share a dtype"),
    (dict(cu=torch.tensor([0, 10])), "int32"),
    (dict(max_seqlen=torch.tensor(10)), "host int"),
    (dict(cu=torch.tensor([0, 4, 9], dtype=torch.int32)), "rise from 0 to T=10"),
    (dict(max_seqlen=5), "max_seqlen=5 is shorter than a segment of 6"),
    (dict(k=torch.randn(12, 2, 8), v=torch.randn(12, 2, 8)), r"Tq = Tk unless cu_seqlens_k"),
    (dict(options=dict(cu_seqlens_k=cu_of([4, 6]))), "come together"),
    (dict(options=dict(cu_seqlens_k=cu_of([4, 3, 3]), max_seqlen_k=4)), "cu_seqlens_k has 4 boundaries"),
    (dict(options=dict(cu_seqlens_k=cu_of([4, 7]), max_seqlen_k=7)), "cu_seqlens_k must rise from 0 to T=10"),
    (dict(options=dict(cu_seqlens_k=cu_of([3, 7]), max_seqlen_k=6)), "max_seqlen_k=6 is shorter than a segment of 7"),
    (dict(options=dict(window_size=(-2, 0))), "window_size must be"),
    (dict(options=dict(window_size=4)), "window_size must be"),
    (dict(options=dict(softcap=-1.0)), "softcap must be a number >= 0"),
])
def test_bad_inputs_are_named(args, message):
    inputs = dict(q=torch.randn(10, 4, 8), k=torch.randn(10, 2, 8), v=torch.randn(10, 2, 8), cu=cu_of([4, 6]),
                  max_seqlen=6, options={})
    inputs.update(args)
    with pytest.raises(ValueError, match=message):
        varlen_attention(inputs["q"], inputs["k"], inputs["v"], inputs["cu"], inputs["max_seqlen"], **inputs["options"])


def test_triton_kernels_in_the_interpreter():
    """tests/kernels/varlen_attention_cases.py under TRITON_INTERPRET=1, which must precede importing
    triton, hence its own process; the suite's other tests keep the compiled (or reference) paths."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(ROOT, "tests", "kernels", "varlen_attention_cases.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 14 and not re.search(r"skipped|xfail|deselected|error", summary), \
        summary


# Spills at head dims <= 128 (bytes per thread, the most over fp16/bf16), as bench/results/compile-sm90-sm80/
# varlen_attention.md records them; everything else spills nothing (D = 256 spills in the backward at every
# size tried). Key: kernel, HEAD_DIM, BLOCK_M, BLOCK_N, warps, stages, ATOMIC_DQ (-1: none), SOFTCAP, sm.
# The plain kernels' windows and separate q/k segments raised dK/dV with atomic dQ at D = 64 on sm_80 from
# 8 to 32 bytes and D = 80 on sm_90 from 0 to 24; the softcap variants (new) spill up to 104.
KNOWN_SPILLS = {
    ("_bwd_dkdv_kernel", 64, 64, 64, 8, 2, 0, 0, 80): 8, ("_bwd_dkdv_kernel", 64, 64, 64, 8, 2, 0, 1, 80): 8,
    ("_bwd_dkdv_kernel", 64, 64, 64, 8, 2, 1, 0, 80): 24, ("_bwd_dkdv_kernel", 64, 64, 64, 8, 2, 1, 1, 80): 24,
    ("_bwd_dkdv_kernel", 64, 64, 128, 8, 2, 0, 1, 80): 16, ("_bwd_dkdv_kernel", 64, 64, 128, 8, 2, 1, 0, 80): 32,
    ("_bwd_dkdv_kernel", 64, 64, 128, 8, 2, 1, 1, 80): 40, ("_bwd_dkdv_kernel", 80, 64, 64, 8, 2, 1, 0, 90): 24,
    ("_bwd_dkdv_kernel", 80, 64, 64, 8, 2, 1, 1, 90): 104, ("_bwd_dkdv_kernel", 128, 64, 64, 8, 2, 0, 1, 90): 16,
    ("_bwd_dkdv_kernel", 128, 64, 64, 8, 2, 1, 1, 90): 40, ("_bwd_dkdv_kernel", 128, 64, 64, 8, 3, 0, 1, 90): 16,
    ("_bwd_dkdv_kernel", 128, 64, 64, 8, 3, 1, 1, 90): 48, ("_bwd_dq_kernel", 64, 64, 64, 4, 2, -1, 1, 80): 32,
    ("_bwd_dq_kernel", 128, 64, 64, 4, 2, -1, 1, 80): 32, ("_bwd_dq_kernel", 128, 64, 64, 4, 2, -1, 1, 90): 16,
    ("_fwd_kernel", 64, 128, 64, 4, 3, -1, 1, 80): 24, ("_fwd_kernel", 64, 128, 128, 8, 3, -1, 0, 80): 8,
    ("_fwd_kernel", 64, 128, 128, 8, 3, -1, 1, 80): 8,
}


def allowed_spill(r) -> int:
    c = r.constexprs
    return KNOWN_SPILLS.get((r.kernel, c["HEAD_DIM"], c.get("BLOCK_M"), c.get("BLOCK_N"), r.num_warps, r.num_stages,
                             int(c.get("ATOMIC_DQ", -1)), int(c.get("SOFTCAP", 0)), r.capability), 0)


def test_every_launch_compiles_for_sm90_and_sm80_with_wgmma_on_hopper():
    """Every kernel x configuration the launchers pick (head dims 64/128/256 and 80, fp16/bf16, MHA/GQA,
    causal or not, windowed, separate q/k segments, softcap or not, deterministic or not; captured from the
    launchers themselves) compiles for H100 and
    A100; on sm_90 every tl.dot is a wgmma (HGMMA in SASS, no HMMA), on sm_80 an mma.sync (HMMA); shared
    memory fits each. Registers and spills: python tests/helpers/compile_check.py (copy in bench/results/)."""
    launches = compile_check.varlen_attention_launches()
    kernels = {launch.spec.kernel.fn.__name__ for launch in launches}
    assert kernels == {"_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    # 7 (dtype, head dim) cases x (preprocess + 4 kernels x softcap or not): causal, windows, q/k segments,
    # GQA and sizes are runtime arguments and do not multiply the binaries
    assert len(launches) == 7 * 9
    assert {launch.spec.constexprs.get("SOFTCAP") for launch in launches} == {None, False, True}
    jobs = [(launch, cap) for launch in launches for cap in (90, 80)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # ptxas and LLVM release the GIL
        reports = list(pool.map(lambda job: compile_check.compile_launch(*job), jobs))
    for r in reports:
        where = f"{r.kernel} {r.constexprs} sm_{r.capability}"
        assert 0 < r.shared <= compile_check.SHARED_LIMIT[r.capability], where
        assert r.registers <= 255, where
        if r.constexprs["D_PAD"] <= 128:  # D = 256 spills (bench/results/compile-sm90-sm80/varlen_attention.md)
            assert r.spill_bytes <= allowed_spill(r), f"{where}: {r.spill_bytes} bytes of spills per thread"
        if r.kernel == "_bwd_preprocess_kernel":
            assert r.hgmma == r.hmma == r.wgmma_dots == r.ttgir_dots == 0, where
        elif r.capability == 90:
            assert r.ttgir_dots == 0 and r.wgmma_dots > 0 and r.hgmma > 0 and r.hmma == 0, where
        else:
            assert r.hmma > 0 and r.hgmma == 0, where


def test_every_tuning_candidate_compiles_for_sm90_and_sm80():
    """Each candidate block configuration the tuner may pick (bf16, head dims 64/128/256, softcap or not)
    compiles for both
    architectures with wgmma on sm_90, fits shared memory, and spills no more than KNOWN_SPILLS says for
    D <= 128 (the D = 256 backward has its spilling default only)."""
    launches = compile_check.varlen_attention_candidate_launches()
    expected = 2 * sum(len(table[d]) * (2 if table is va.DKDV_CONFIGS else 1) for d in (64, 128, 256)
                   for table in (va.FWD_CONFIGS, va.DKDV_CONFIGS, va.DQ_CONFIGS))
    assert len(launches) == expected
    jobs = [(launch, cap) for launch in launches for cap in (90, 80)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        reports = list(pool.map(lambda job: compile_check.compile_launch(*job), jobs))
    for r in reports:
        where = f"{r.kernel} {r.constexprs} w{r.num_warps}/s{r.num_stages} sm_{r.capability}"
        assert 0 < r.shared <= compile_check.SHARED_LIMIT[r.capability], where
        if r.constexprs["D_PAD"] <= 128:
            assert r.spill_bytes <= allowed_spill(r), f"{where}: {r.spill_bytes} bytes of spills"
        if r.capability == 90:
            assert r.ttgir_dots == 0 and r.wgmma_dots > 0 and r.hgmma > 0 and r.hmma == 0, where
        else:
            assert r.hmma > 0 and r.hgmma == 0, where


# ------------------------------------------------------------------------------ benchmark helpers

def test_bench_lengths_flops_and_document_mask():
    lengths = bench.packed_lengths(8192, 128, 4096, seed=0)
    assert sum(lengths) == 8192 and all(1 <= n <= 4096 for n in lengths) and min(lengths[:-1]) >= 128
    assert bench.packed_lengths(8192, 128, 4096, seed=0) == lengths
    # 4 * sum(L^2) * H * D, halved when causal; backward 2.5x
    assert bench.attention_flops([2, 3], heads=4, head_dim=8, causal=False) == 4 * 13 * 4 * 8
    assert bench.attention_flops([2, 3], heads=4, head_dim=8, causal=True, mode="bwd") == 2.5 * 2 * 13 * 4 * 8
    doc = bench.document_ids([2, 3], "cpu")
    qi, ki = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    mask = bench.document_mask_mod(doc)(0, 0, qi, ki)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(mask, expected.bool())


def test_bench_adapts_to_varlen_attn_signatures():
    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        pass

    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False):
        pass

    assert bench.varlen_attn_kwargs(old, causal=True, scale=0.1, gqa=True) == ({"is_causal": True}, True)
    assert bench.varlen_attn_kwargs(new, causal=True, scale=0.1, gqa=True) == (
        {"window_size": (-1, 0), "scale": 0.1, "enable_gqa": True}, False)


# ----------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_matches_reference(dtype, deterministic):
    errors = bench.compare_with_reference([1, 127, 128, 129, 700, 2048, 3, 300], heads=(8, 2), head_dim=128,
                                          dtype=dtype, deterministic=deterministic)
    assert all(e["ok"] for e in errors.values()), errors


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_gpu_other_head_dims(head_dim):
    errors = bench.compare_with_reference([5, 64, 333], heads=(4, 4), head_dim=head_dim, dtype=torch.bfloat16,
                                          deterministic=False, causal=False)
    assert all(e["ok"] for e in errors.values()), errors


@pytest.mark.gpu
@needs_cuda
def test_gpu_deterministic_is_bitwise_and_nothing_syncs():
    lengths = [100, 2000, 1, 900]
    q, k, v = (torch.randn(3001, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2))
    do, cu = torch.randn_like(q), cu_of(lengths, "cuda")

    def grads(deterministic):
        o = varlen_attention(q, k, v, cu, 2000, deterministic=deterministic)
        return torch.autograd.grad(o, (q, k, v), do)

    first, _ = grads(True), grads(False)  # compile both variants outside the sync check
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = grads(True)
        grads(False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
