"""Varlen (packed) flash attention: Triton forward and backward, shaped like flash_attn_varlen_func.

Public API (DESIGN.md, stable; `deterministic` is an extension):
    o = varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None, deterministic=None)
    q [T, Hq, D], k/v [T, Hkv, D] (Hq % Hkv == 0, D <= 256), cu_seqlens int32 [S+1] -> o [T, Hq, D]

Segment i is the tokens cu_seqlens[i]:cu_seqlens[i+1]; cu_seqlens runs from 0 to T, and a token attends
only to tokens of its own segment (causal: to those not after it). q and k share the segments, so
causal alignment is unambiguous. Outputs of padding segments are computed like any other and ignored.

Layout (Liger's): Triton kernels, their launchers, one autograd.Function, the public function; the
PyTorch reference (per-segment SDPA, varlen_attention_reference.py) is the CPU path and the test oracle.
Dispatch: CUDA fp16/bf16 -> Triton; everything else -> reference, except that with TRITON_INTERPRET=1
CPU fp32/fp16 run the Triton code (bf16 is computed wrongly by the interpreter, so it stays on the
reference).

Kernels (FA2's algorithm, log2 domain): the forward keeps a running max and sum per query row and saves
lse = log2(sum exp2) per (head, token) for the backward. The backward recomputes P from lse; one program
per (key block, query head) accumulates dK, dV over the query blocks (with GQA into per-query-head
buffers that torch sums over each group, FA2's scheme: no atomics), and dQ is either added with fp32
atomics from the same program (default, 5 matmuls per block pair) or, when deterministic, computed by a
second kernel that walks the key blocks of each query block (7 matmuls, no atomics, bitwise reproducible).
Looping over a KV group inside one program instead spilled 0.4-0.5 KiB of registers per thread (sm_90).
Grids index blocks by (segment, block) with early exit past a segment's end, so the host never reads
cu_seqlens: no synchronisation. Offsets inside a segment are int32, so max_seqlen * Hq * D must stay
below 2**31.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .dispatch import TENSOR_CORE_DTYPES, uses_triton
from .varlen_attention_reference import check_segments, varlen_attention_reference

MAX_HEAD_DIM = 256


class BlockConfig(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


# Per padded head dim. Chosen by compiling candidates for sm_90 and sm_80 (tests/helpers/compile_check.py): fit
# sm_80's 163 KiB of shared memory, give every tl.dot M >= 64 (wgmma's minimum), no register spills for
# D <= 128 (D = 256 spills in the backward: 0.2-1 KiB per thread). Not yet timed on a GPU.
# Causal masking needs fwd/dq block_m % block_n == 0 and dkdv block_n % block_m == 0.
FWD_CONFIGS = {64: BlockConfig(128, 64, 4, 3), 128: BlockConfig(128, 64, 8, 3), 256: BlockConfig(64, 32, 8, 2)}
DKDV_CONFIGS = {64: BlockConfig(64, 128, 8, 2), 128: BlockConfig(64, 64, 8, 2), 256: BlockConfig(64, 64, 8, 1)}
DQ_CONFIGS = {64: BlockConfig(128, 64, 8, 2), 128: BlockConfig(128, 32, 8, 2), 256: BlockConfig(64, 32, 4, 2)}
PREPROCESS_BLOCK = 64  # tokens per program of the rowsum(O * dO) kernel

LOG2E = 1.4426950408889634


def padded_head_dim(head_dim: int) -> int:
    """The tile width for a head dim: the next power of two, at least 64 (smaller heads are toy models;
    each bucket is one more set of kernels to compile and check)."""
    return max(64, triton.next_power_of_2(head_dim))


# ----------------------------------------------------------------------------------------- kernels

@triton.jit
def _load_rows(base, rows, n_rows, stride, offs_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Tile [len(rows), D_PAD] of a [rows, D] matrix; rows >= n_rows and columns >= HEAD_DIM read 0."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if HEAD_DIM == D_PAD:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_rows(base, rows, n_rows, stride, offs_d, tile, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if HEAD_DIM == D_PAD:
        tl.store(ptrs, tile, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d, seqlen, shift,
               qk_scale, lo, hi, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr):
    """Online softmax over key blocks [lo, hi); MASK applies the segment end and the causal diagonal."""
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(k_base, cols, seqlen, stride_kt, offs_d, HEAD_DIM, D_PAD)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK:
            valid = (cols[None, :] < seqlen) & (cols[None, :] <= rows[:, None] + shift)
            s = tl.where(valid, s, float("-inf"))
        # every row meets a visible key in its first block (key 0), so m_new is finite: no inf - inf
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, cols, seqlen, stride_vt, offs_d, HEAD_DIM, D_PAD)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_block(CU, num_m_blocks, causal, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's segment (start, seqlen) and query block m0 (causal: the longest rows of a segment
    start first), and its key ranges, shared by the forward and dQ: keys [0, full_hi) need no mask,
    [full_hi, masked_hi) do (causal: the diagonal blocks; otherwise the segment's last, partial key
    block). shift = 0 makes the mask causal. The caller returns when m0 >= seqlen."""
    pid = tl.program_id(0)
    m0 = (num_m_blocks - 1 - pid % num_m_blocks) * BLOCK_M
    start = tl.load(CU + pid // num_m_blocks)
    seqlen = tl.load(CU + pid // num_m_blocks + 1) - start
    shift = (1 - causal) * seqlen
    full_hi = tl.where(causal != 0, m0, (seqlen // BLOCK_N) * BLOCK_N)
    masked_hi = tl.where(causal != 0, tl.minimum(m0 + BLOCK_M, seqlen), seqlen)
    return start.to(tl.int64), seqlen, m0, shift, full_hi, masked_hi


@triton.jit(do_not_specialize=["causal", "group", "total_tokens", "num_m_blocks"])
def _fwd_kernel(Q, K, V, O, LSE, CU, qk_scale, causal, group, total_tokens, num_m_blocks,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start, seqlen, m0, shift, full_hi, masked_hi = _query_block(CU, num_m_blocks, causal, BLOCK_M, BLOCK_N)
    if m0 >= seqlen:
        return
    head = tl.program_id(1)
    kv_head = head // group
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(Q + start * stride_qt + head * stride_qh, rows, seqlen, stride_qt, offs_d, HEAD_DIM, D_PAD)
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                               seqlen, shift, qk_scale, 0, full_hi, HEAD_DIM, D_PAD, BLOCK_N, False)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                               seqlen, shift, qk_scale, full_hi, masked_hi, HEAD_DIM, D_PAD, BLOCK_N, True)
    acc = acc / l_i[:, None]
    _store_rows(O + start * stride_ot + head * stride_oh, rows, seqlen, stride_ot, offs_d,
                acc.to(O.dtype.element_ty), HEAD_DIM, D_PAD)
    tl.store(LSE + head.to(tl.int64) * total_tokens + start + rows, m_i + tl.math.log2(l_i), mask=rows < seqlen)


@triton.jit(do_not_specialize=["total_tokens"])
def _bwd_preprocess_kernel(O, DO, DELTA, total_tokens, stride_ot, stride_oh, stride_dot, stride_doh,
                           HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """delta[h, t] = sum_d O[t, h, d] * dO[t, h, d], the row term of dS = P * (dP - delta)."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    o = _load_rows(O + head * stride_oh, rows, total_tokens, stride_ot, offs_d, HEAD_DIM, D_PAD)
    do = _load_rows(DO + head * stride_doh, rows, total_tokens, stride_dot, offs_d, HEAD_DIM, D_PAD)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head.to(tl.int64) * total_tokens + rows, delta, mask=rows < total_tokens)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                    stride_dqt, cols, offs_m, offs_d, seqlen, shift, qk_scale, lo, hi,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi); rows past the end read zeros,
    which makes their contribution exactly 0, so only the key end and the diagonal need MASK."""
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        q = _load_rows(q_base, rows, seqlen, stride_qt, offs_d, HEAD_DIM, D_PAD)
        do = _load_rows(do_base, rows, seqlen, stride_dot, offs_d, HEAD_DIM, D_PAD)
        lse = tl.load(lse_base + rows, mask=rows < seqlen, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows < seqlen, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
        if MASK:
            valid = (cols[:, None] < seqlen) & (cols[:, None] <= rows[None, :] + shift)
            p_t = tl.where(valid, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k)  # unscaled; the launcher multiplies by sm_scale
            ptrs = dq_base + rows[:, None] * stride_dqt + offs_d[None, :]
            # relaxed: only atomicity is needed; the kernel's end orders the adds before dQ is read
            tl.atomic_add(ptrs, dq, mask=(rows[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["causal", "group", "total_tokens", "num_n_blocks"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, CU, DK, DV, DQ, sm_scale, qk_scale, causal, group, total_tokens,
                     num_n_blocks, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot,
                     stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     ATOMIC_DQ: tl.constexpr):
    pid = tl.program_id(0)
    seq = pid // num_n_blocks
    n_block = pid % num_n_blocks  # causal: the first key blocks have the most rows to visit, so start them first
    head = tl.program_id(1)  # a query head; with GQA its dK, dV partials go to an expanded buffer
    start = tl.load(CU + seq)
    seqlen = tl.load(CU + seq + 1) - start
    n0 = n_block * BLOCK_N
    if n0 >= seqlen:
        return
    start = start.to(tl.int64)
    kv_head = head // group
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    k = _load_rows(K + start * stride_kt + kv_head * stride_kh, cols, seqlen, stride_kt, offs_d, HEAD_DIM, D_PAD)
    v = _load_rows(V + start * stride_vt + kv_head * stride_vh, cols, seqlen, stride_vt, offs_d, HEAD_DIM, D_PAD)
    q_base = Q + start * stride_qt + head * stride_qh
    do_base = DO + start * stride_dot + head * stride_doh
    lse_base = LSE + head.to(tl.int64) * total_tokens + start
    delta_base = DELTA + head.to(tl.int64) * total_tokens + start
    dq_base = DQ + start * stride_dqt + head * stride_dqh
    # Rows [lo, mid) need the mask: causal, the diagonal block (rows before n0 see none of these keys);
    # the segment's last, partial key block needs it everywhere. Rows [mid, seqlen) see every key.
    shift = (1 - causal) * seqlen
    lo = tl.where(causal != 0, n0, 0)
    mid = tl.where(n0 + BLOCK_N > seqlen, seqlen, tl.where(causal != 0, n0 + BLOCK_N, 0))
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                             stride_dqt, cols, offs_m, offs_d, seqlen, shift, qk_scale, lo, mid,
                             HEAD_DIM, D_PAD, BLOCK_M, True, ATOMIC_DQ)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                             stride_dqt, cols, offs_m, offs_d, seqlen, shift, qk_scale, mid, seqlen,
                             HEAD_DIM, D_PAD, BLOCK_M, False, ATOMIC_DQ)
    _store_rows(DK + start * stride_dkt + head * stride_dkh, cols, seqlen, stride_dkt, offs_d,
                (dk * sm_scale).to(DK.dtype.element_ty), HEAD_DIM, D_PAD)
    _store_rows(DV + start * stride_dvt + head * stride_dvh, cols, seqlen, stride_dvt, offs_d,
                dv.to(DV.dtype.element_ty), HEAD_DIM, D_PAD)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d, seqlen,
                  shift, qk_scale, lo, hi, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(k_base, cols, seqlen, stride_kt, offs_d, HEAD_DIM, D_PAD)
        v = _load_rows(v_base, cols, seqlen, stride_vt, offs_d, HEAD_DIM, D_PAD)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASK:
            valid = (cols[None, :] < seqlen) & (cols[None, :] <= rows[:, None] + shift)
            p = tl.where(valid, p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit(do_not_specialize=["causal", "group", "total_tokens", "num_m_blocks"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, CU, DQ, sm_scale, qk_scale, causal, group, total_tokens, num_m_blocks,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start, seqlen, m0, shift, full_hi, masked_hi = _query_block(CU, num_m_blocks, causal, BLOCK_M, BLOCK_N)
    if m0 >= seqlen:
        return
    head = tl.program_id(1)
    kv_head = head // group
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(Q + start * stride_qt + head * stride_qh, rows, seqlen, stride_qt, offs_d, HEAD_DIM, D_PAD)
    do = _load_rows(DO + start * stride_dot + head * stride_doh, rows, seqlen, stride_dot, offs_d, HEAD_DIM, D_PAD)
    lse = tl.load(LSE + head.to(tl.int64) * total_tokens + start + rows, mask=rows < seqlen, other=0.0)
    delta = tl.load(DELTA + head.to(tl.int64) * total_tokens + start + rows, mask=rows < seqlen, other=0.0)
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d, seqlen,
                       shift, qk_scale, 0, full_hi, HEAD_DIM, D_PAD, BLOCK_N, False)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d, seqlen,
                       shift, qk_scale, full_hi, masked_hi, HEAD_DIM, D_PAD, BLOCK_N, True)
    _store_rows(DQ + start * stride_dqt + head * stride_dqh, rows, seqlen, stride_dqt, offs_d,
                (dq * sm_scale).to(DQ.dtype.element_ty), HEAD_DIM, D_PAD)


# --------------------------------------------------------------------------------------- launchers

class LaunchSpec(NamedTuple):
    """A kernel and its compile-time choices: what the launcher runs and the compile test compiles."""
    kernel: object
    constexprs: dict
    num_warps: int
    num_stages: int


def forward_spec(head_dim: int) -> LaunchSpec:
    d_pad = padded_head_dim(head_dim)
    cfg = FWD_CONFIGS[d_pad]
    return LaunchSpec(_fwd_kernel, dict(HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
                      cfg.num_warps, cfg.num_stages)


def backward_specs(head_dim: int, deterministic: bool) -> list[LaunchSpec]:
    """The backward's launches in order: rowsum(O * dO), dK/dV (+ atomic dQ unless deterministic), [dQ]."""
    dims = dict(HEAD_DIM=head_dim, D_PAD=padded_head_dim(head_dim))
    kv, qc = DKDV_CONFIGS[dims["D_PAD"]], DQ_CONFIGS[dims["D_PAD"]]
    specs = [LaunchSpec(_bwd_preprocess_kernel, dict(dims, BLOCK=PREPROCESS_BLOCK), 4, 1),
             LaunchSpec(_bwd_dkdv_kernel, dict(dims, BLOCK_M=kv.block_m, BLOCK_N=kv.block_n,
                                               ATOMIC_DQ=not deterministic), kv.num_warps, kv.num_stages)]
    if deterministic:
        specs.append(LaunchSpec(_bwd_dq_kernel, dict(dims, BLOCK_M=qc.block_m, BLOCK_N=qc.block_n),
                                qc.num_warps, qc.num_stages))
    return specs


def launch(spec: LaunchSpec, grid, *args):
    """The one place kernels start (the compile test intercepts it to see every launch)."""
    spec.kernel[grid](*args, **spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages)


def varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, sm_scale: float):
    """Triton forward: o [T, Hq, D] and lse [Hq, T] (fp32, log2 units)."""
    T, Hq, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    spec = forward_spec(D)
    num_m = triton.cdiv(max_seqlen, spec.constexprs["BLOCK_M"])
    launch(spec, (num_m * (cu_seqlens.numel() - 1), Hq), q, k, v, o, lse, cu_seqlens, sm_scale * LOG2E, int(causal),
           Hq // k.shape[1], T, num_m, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *o.stride()[:2])
    return o, lse


def varlen_attention_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen: int, causal: bool, sm_scale: float,
                              deterministic: bool):
    """Triton backward: dq, dk, dv. Deterministic: dQ by its own kernel instead of fp32 atomics."""
    T, Hq, D = q.shape
    Hkv, S = k.shape[1], cu_seqlens.numel() - 1
    pre, dkdv, *dq_spec = backward_specs(D, deterministic)
    delta = torch.empty_like(lse)
    launch(pre, (triton.cdiv(T, PREPROCESS_BLOCK), Hq), o, do, delta, T, *o.stride()[:2], *do.stride()[:2])
    # GQA: per-query-head partials, summed over each group below (FA2's scheme: no atomics, deterministic)
    dk, dv = (torch.empty((T, Hq, D), dtype=k.dtype, device=k.device) for _ in range(2))
    if Hq == Hkv:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    # atomic dQ accumulates in fp32; the deterministic dQ kernel writes q's dtype directly
    dq = torch.empty_like(q) if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    num_n = triton.cdiv(max_seqlen, dkdv.constexprs["BLOCK_N"])
    launch(dkdv, (num_n * S, Hq), q, k, v, do, lse, delta, cu_seqlens, dk, dv, dq, sm_scale, sm_scale * LOG2E,
           int(causal), Hq // Hkv, T, num_n, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *do.stride()[:2],
           *dk.stride()[:2], *dv.stride()[:2], *dq.stride()[:2])
    if Hq != Hkv:
        dk, dv = (x.view(T, Hkv, Hq // Hkv, D).sum(2, dtype=torch.float32).to(k.dtype) for x in (dk, dv))
    if not deterministic:
        return (dq * sm_scale).to(q.dtype), dk, dv
    (spec,) = dq_spec
    num_m = triton.cdiv(max_seqlen, spec.constexprs["BLOCK_M"])
    launch(spec, (num_m * S, Hq), q, k, v, do, lse, delta, cu_seqlens, dq, sm_scale, sm_scale * LOG2E, int(causal),
           Hq // Hkv, T, num_m, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *do.stride()[:2],
           *dq.stride()[:2])
    return dq, dk, dv


class VarlenAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, sm_scale, deterministic):
        o, lse = varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.args = (max_seqlen, causal, sm_scale, deterministic)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = varlen_attention_backward(do.contiguous(), q, k, v, o, lse, cu_seqlens, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


# ------------------------------------------------------------------------------------------ public

def check_inputs(q, k, v, cu_seqlens, max_seqlen) -> None:
    """Shape checks that need no synchronisation."""
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, Hq, D] and k, v [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[2]} > {MAX_HEAD_DIM} is not supported")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of at least 2 boundaries")
    if not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive host int (no sync), got {max_seqlen!r}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, causal: bool = True, softmax_scale: Optional[float] = None,
                     deterministic: Optional[bool] = None) -> torch.Tensor:
    """Attention within each segment of cu_seqlens. deterministic=None follows
    torch.are_deterministic_algorithms_enabled(); it only changes how the Triton backward sums dQ."""
    check_inputs(q, k, v, cu_seqlens, max_seqlen)
    scale = q.shape[2] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not uses_triton(q, cuda_dtypes=TENSOR_CORE_DTYPES):  # no fp32 tiles: fp32 on CUDA takes the reference
        return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=scale)
    if not q.is_cuda:  # the interpreter does not bounds-check: validate here, where a host read costs nothing
        check_segments(cu_seqlens, q.shape[0], max_seqlen)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return VarlenAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, bool(causal), scale, bool(deterministic))
