"""The Triton kernels of varlen attention (FA2's algorithm, log2 domain); kernels/varlen_attention.py holds
their launch configurations, launchers, the torch.library op and the public function.

Forward: a running max and sum per query row; lse = log2(sum exp2) saved per (head, token). Backward:
rowsum(O * dO), then one program per (key block, query head) accumulating dK, dV over the query blocks
(dQ by fp32 atomics from the same program, or by `_bwd_dq_kernel` when deterministic). Grids index blocks
by (segment, block) and exit early past a segment's end, so nothing reads cu_seqlens on the host.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
