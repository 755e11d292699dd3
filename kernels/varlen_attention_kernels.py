"""The Triton kernels of varlen attention (FA2's algorithm, log2 domain); kernels/varlen_attention.py holds
their launch configurations, launchers, the torch.library op and the public function.

Forward: a running max and sum per query row; lse = log2(sum exp2) saved per (head, query token).
Backward: rowsum(O * dO), then one program per (key block, query head) accumulating dK, dV over the query
blocks (dQ by fp32 atomics from the same program, or by `_bwd_dq_kernel` when deterministic). Grids index
blocks by (segment, block) and exit early past a segment's end, so nothing reads cu_seqlens on the host.

Masking (flash-attn >= 2.1): in a segment of lq queries and lk keys, query i sees key j iff j < lk and
i + shift - left <= j <= i + shift + right, shift = lk - lq (bottom-right alignment); causal is
(left, right) = (unbounded, 0), and the launcher passes an unbounded side as max_seqlen (wide enough for
every segment). Each program visits only the key (or query) blocks that meet its window, in three ranges:
masked [lo, a), unmasked [a, b), masked [b, hi); blocks outside the window are never loaded. A query row
with no visible key (lq > lk, causal) gets o = 0 and lse = -inf. SOFTCAP (constexpr: the plain kernels
keep their code) replaces the scores by cap * tanh(s / cap) and multiplies dS by 1 - tanh^2.
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
def _tanh(x):
    # 1 - 2 / (e^2x + 1): exact limits at +-inf (exp2 overflows to inf or 0), no libdevice (the interpreter
    # runs it too); absolute error ~1e-7 in fp32, which the cap multiplies
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _scores(qk, qk_scale, tanh_scale, cap_log2, SOFTCAP: tl.constexpr):
    """Scores in the log2 domain from raw q.k, and tanh of the capped ones (without SOFTCAP a same-typed
    placeholder that nothing reads: both branches must return one type)."""
    if SOFTCAP:
        t = _tanh(qk * tanh_scale)
        return t * cap_log2, t
    return qk * qk_scale, qk


@triton.jit
def _window_of_rows(rows, seqlen_k, shift, left, right):
    """The first and last key each query row sees ([len(rows)] each; last < first: none): the forward and dQ
    compute it once per program, so their masked loops compare each tile element twice, as the causal mask
    alone did (a third compare in the loop spilled on sm_80)."""
    return rows + shift - left, tl.minimum(rows + shift + right, seqlen_k - 1)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, first, last, offs_n, offs_d, seqlen_k,
               qk_scale, tanh_scale, cap_log2, lo, hi, lo2, hi2, HEAD_DIM: tl.constexpr,
               D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online softmax over key blocks [lo, hi) then [lo2, hi2) (one loop: a second copy of the body cost
    registers); MASK applies the segment end and the window."""
    n1 = tl.maximum(hi - lo + BLOCK_N - 1, 0) // BLOCK_N
    n_blocks = n1 + tl.maximum(hi2 - lo2 + BLOCK_N - 1, 0) // BLOCK_N if MASK else n1
    for i in range(0, n_blocks):
        if MASK:
            cols = tl.where(i < n1, lo + i * BLOCK_N, lo2 + (i - n1) * BLOCK_N) + offs_n
        else:
            cols = lo + i * BLOCK_N + offs_n
        k = _load_rows(k_base, cols, seqlen_k, stride_kt, offs_d, HEAD_DIM, D_PAD)
        s, _ = _scores(tl.dot(q, tl.trans(k)), qk_scale, tanh_scale, cap_log2, SOFTCAP)
        if MASK:
            visible = (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])
            s = tl.where(visible, s, float("-inf"))
            # a row may see no key of this block (window edge, or none at all): keep exp2 off -inf - -inf
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every row sees every key here: m_new is finite
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, cols, seqlen_k, stride_vt, offs_d, HEAD_DIM, D_PAD)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_block(CU_Q, CU_K, num_m_blocks, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's segment and query block m0 (the longest causal rows of a segment start first), and
    its key ranges, shared by the forward and dQ: masked [lo, a), unmasked [a, b), masked [b, hi). The
    caller returns when m0 >= seqlen_q."""
    pid = tl.program_id(0)
    seq = pid // num_m_blocks
    m0 = (num_m_blocks - 1 - pid % num_m_blocks) * BLOCK_M
    start_q = tl.load(CU_Q + seq)
    seqlen_q = tl.load(CU_Q + seq + 1) - start_q
    start_k = tl.load(CU_K + seq)
    seqlen_k = tl.load(CU_K + seq + 1) - start_k
    shift = seqlen_k - seqlen_q
    m_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo = tl.maximum(0, m0 + shift - left) // BLOCK_N * BLOCK_N  # keys some row of the block sees
    hi = tl.minimum(seqlen_k, m_last + shift + right + 1)
    a = (tl.maximum(0, m_last + shift - left) + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # keys every row sees
    b = tl.minimum(seqlen_k, m0 + shift + right + 1) // BLOCK_N * BLOCK_N
    none = b <= a
    a = tl.where(none, lo, a)
    b = tl.where(none, lo, b)
    return start_q.to(tl.int64), start_k.to(tl.int64), seqlen_q, seqlen_k, m0, shift, lo, a, b, hi


@triton.jit
def _query_tile(Q, K, V, start_q, start_k, seqlen_q, m0, group, stride_qt, stride_qh, stride_kt, stride_kh,
                stride_vt, stride_vh, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The query block's head, rows, offsets, q tile and key/value bases (forward and dQ alike)."""
    head = tl.program_id(1)
    kv_head = head // group
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(Q + start_q * stride_qt + head * stride_qh, rows, seqlen_q, stride_qt, offs_d, HEAD_DIM, D_PAD)
    k_base = K + start_k * stride_kt + kv_head * stride_kh
    v_base = V + start_k * stride_vt + kv_head * stride_vh
    return head, rows, offs_n, offs_d, q, k_base, v_base


@triton.jit(do_not_specialize=["left", "right", "group", "total_q", "num_m_blocks"])
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, qk_scale, tanh_scale, cap_log2, left, right, group, total_q,
                num_m_blocks, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SOFTCAP: tl.constexpr):
    start_q, start_k, seqlen_q, seqlen_k, m0, shift, lo, a, b, hi = _query_block(CU_Q, CU_K, num_m_blocks, left,
                                                                                 right, BLOCK_M, BLOCK_N)
    if m0 >= seqlen_q:
        return
    head, rows, offs_n, offs_d, q, k_base, v_base = _query_tile(
        Q, K, V, start_q, start_k, seqlen_q, m0, group, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
        stride_vh, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N)

    first, last = _window_of_rows(rows, seqlen_k, shift, left, right)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, first, last, offs_n, offs_d,
                               seqlen_k, qk_scale, tanh_scale, cap_log2, a, b, b, b,
                               HEAD_DIM, D_PAD, BLOCK_N, False, SOFTCAP)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, first, last, offs_n, offs_d,
                               seqlen_k, qk_scale, tanh_scale, cap_log2, lo, a, b, hi,
                               HEAD_DIM, D_PAD, BLOCK_N, True, SOFTCAP)
    empty = l_i == 0.0  # a row that sees no key: o = 0 (acc is 0), lse = -inf
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    _store_rows(O + start_q * stride_ot + head * stride_oh, rows, seqlen_q, stride_ot, offs_d,
                acc.to(O.dtype.element_ty), HEAD_DIM, D_PAD)
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + head.to(tl.int64) * total_q + start_q + rows, lse, mask=rows < seqlen_q)


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
                    stride_dqt, cols, offs_m, offs_d, seqlen_q, seqlen_k, shift, left, right, qk_scale,
                    tanh_scale, cap_log2, lo, hi, lo2, hi2, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, MASK: tl.constexpr, ATOMIC_DQ: tl.constexpr, SOFTCAP: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) and, with MASK, [lo2, hi2) in the same
    loop (a third copy of the body cost registers); rows past the end read zeros, which makes their
    contribution exactly 0, so only the key end and the window need MASK. A row that sees no key
    (lse = -inf) is masked everywhere it appears."""
    n1 = tl.maximum(hi - lo + BLOCK_M - 1, 0) // BLOCK_M
    n_blocks = n1 + tl.maximum(hi2 - lo2 + BLOCK_M - 1, 0) // BLOCK_M if MASK else n1
    for i in range(0, n_blocks):
        if MASK:
            rows = tl.where(i < n1, lo + i * BLOCK_M, lo2 + (i - n1) * BLOCK_M) + offs_m
        else:
            rows = lo + i * BLOCK_M + offs_m
        q = _load_rows(q_base, rows, seqlen_q, stride_qt, offs_d, HEAD_DIM, D_PAD)
        do = _load_rows(do_base, rows, seqlen_q, stride_dot, offs_d, HEAD_DIM, D_PAD)
        lse = tl.load(lse_base + rows, mask=rows < seqlen_q, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows < seqlen_q, other=0.0)
        s_t, t_t = _scores(tl.dot(k, tl.trans(q)), qk_scale, tanh_scale, cap_log2, SOFTCAP)  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASK:
            first, last = _window_of_rows(rows, seqlen_k, shift, left, right)  # rows change per block here
            p_t = tl.where((cols[:, None] >= first[None, :]) & (cols[:, None] <= last[None, :]), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k)  # unscaled; the launcher multiplies by sm_scale
            ptrs = dq_base + rows[:, None] * stride_dqt + offs_d[None, :]
            # relaxed: only atomicity is needed; the kernel's end orders the adds before dQ is read
            tl.atomic_add(ptrs, dq, mask=(rows[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["left", "right", "group", "total_q", "num_n_blocks"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, CU_Q, CU_K, DK, DV, DQ, sm_scale, qk_scale, tanh_scale, cap_log2,
                     left, right, group, total_q, num_n_blocks, stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_vt, stride_vh, stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     stride_dqt, stride_dqh, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, ATOMIC_DQ: tl.constexpr, SOFTCAP: tl.constexpr):
    pid = tl.program_id(0)
    seq = pid // num_n_blocks
    n0 = (pid % num_n_blocks) * BLOCK_N  # causal: the first key blocks have the most rows to visit: first
    head = tl.program_id(1)  # a query head; with GQA its dK, dV partials go to an expanded buffer
    start_k = tl.load(CU_K + seq)
    seqlen_k = tl.load(CU_K + seq + 1) - start_k
    if n0 >= seqlen_k:
        return
    start_q = tl.load(CU_Q + seq)
    seqlen_q = tl.load(CU_Q + seq + 1) - start_q
    start_q = start_q.to(tl.int64)
    start_k = start_k.to(tl.int64)
    kv_head = head // group
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    k = _load_rows(K + start_k * stride_kt + kv_head * stride_kh, cols, seqlen_k, stride_kt, offs_d, HEAD_DIM, D_PAD)
    v = _load_rows(V + start_k * stride_vt + kv_head * stride_vh, cols, seqlen_k, stride_vt, offs_d, HEAD_DIM, D_PAD)
    q_base = Q + start_q * stride_qt + head * stride_qh
    do_base = DO + start_q * stride_dot + head * stride_doh
    lse_base = LSE + head.to(tl.int64) * total_q + start_q
    delta_base = DELTA + head.to(tl.int64) * total_q + start_q
    dq_base = DQ + start_q * stride_dqt + head * stride_dqh
    # Query rows that see some key of the block: [lo, hi); every key: [a, b), where b = seqlen_q may end
    # inside a block (rows past the end add 0). The segment's last, partial key block is masked throughout.
    shift = seqlen_k - seqlen_q
    n_last = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    lo = tl.maximum(0, n0 - shift - right) // BLOCK_M * BLOCK_M
    hi = tl.minimum(seqlen_q, n_last - shift + left + 1)
    a = (tl.maximum(0, n_last - shift - right) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    full_hi = n0 - shift + left + 1
    b = tl.where(full_hi >= seqlen_q, seqlen_q, full_hi // BLOCK_M * BLOCK_M)
    none = (b <= a) | (n0 + BLOCK_N > seqlen_k)
    a = tl.where(none, lo, a)
    b = tl.where(none, lo, b)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                             stride_dqt, cols, offs_m, offs_d, seqlen_q, seqlen_k, shift, left, right, qk_scale,
                             tanh_scale, cap_log2, lo, a, b, hi, HEAD_DIM, D_PAD, BLOCK_M, True, ATOMIC_DQ, SOFTCAP)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                             stride_dqt, cols, offs_m, offs_d, seqlen_q, seqlen_k, shift, left, right, qk_scale,
                             tanh_scale, cap_log2, a, b, b, b, HEAD_DIM, D_PAD, BLOCK_M, False, ATOMIC_DQ, SOFTCAP)
    _store_rows(DK + start_k * stride_dkt + head * stride_dkh, cols, seqlen_k, stride_dkt, offs_d,
                (dk * sm_scale).to(DK.dtype.element_ty), HEAD_DIM, D_PAD)
    _store_rows(DV + start_k * stride_dvt + head * stride_dvh, cols, seqlen_k, stride_dvt, offs_d,
                dv.to(DV.dtype.element_ty), HEAD_DIM, D_PAD)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, first, last, offs_n, offs_d,
                  seqlen_k, qk_scale, tanh_scale, cap_log2, lo, hi, lo2, hi2, HEAD_DIM: tl.constexpr,
                  D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr):
    """dQ over key blocks [lo, hi) and, with MASK, [lo2, hi2) (one loop, as in _fwd_inner)."""
    n1 = tl.maximum(hi - lo + BLOCK_N - 1, 0) // BLOCK_N
    n_blocks = n1 + tl.maximum(hi2 - lo2 + BLOCK_N - 1, 0) // BLOCK_N if MASK else n1
    for i in range(0, n_blocks):
        if MASK:
            cols = tl.where(i < n1, lo + i * BLOCK_N, lo2 + (i - n1) * BLOCK_N) + offs_n
        else:
            cols = lo + i * BLOCK_N + offs_n
        k = _load_rows(k_base, cols, seqlen_k, stride_kt, offs_d, HEAD_DIM, D_PAD)
        v = _load_rows(v_base, cols, seqlen_k, stride_vt, offs_d, HEAD_DIM, D_PAD)
        s, t = _scores(tl.dot(q, tl.trans(k)), qk_scale, tanh_scale, cap_log2, SOFTCAP)
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            p = tl.where((cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None]), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit(do_not_specialize=["left", "right", "group", "total_q", "num_m_blocks"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, CU_Q, CU_K, DQ, sm_scale, qk_scale, tanh_scale, cap_log2, left, right,
                   group, total_q, num_m_blocks, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr):
    start_q, start_k, seqlen_q, seqlen_k, m0, shift, lo, a, b, hi = _query_block(CU_Q, CU_K, num_m_blocks, left,
                                                                                 right, BLOCK_M, BLOCK_N)
    if m0 >= seqlen_q:
        return
    head, rows, offs_n, offs_d, q, k_base, v_base = _query_tile(
        Q, K, V, start_q, start_k, seqlen_q, m0, group, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
        stride_vh, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N)
    do = _load_rows(DO + start_q * stride_dot + head * stride_doh, rows, seqlen_q, stride_dot, offs_d, HEAD_DIM,
                    D_PAD)
    lse = tl.load(LSE + head.to(tl.int64) * total_q + start_q + rows, mask=rows < seqlen_q, other=0.0)
    delta = tl.load(DELTA + head.to(tl.int64) * total_q + start_q + rows, mask=rows < seqlen_q, other=0.0)
    first, last = _window_of_rows(rows, seqlen_k, shift, left, right)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, first, last, offs_n, offs_d,
                       seqlen_k, qk_scale, tanh_scale, cap_log2, a, b, b, b, HEAD_DIM, D_PAD, BLOCK_N,
                       False, SOFTCAP)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, first, last, offs_n, offs_d,
                       seqlen_k, qk_scale, tanh_scale, cap_log2, lo, a, b, hi, HEAD_DIM, D_PAD, BLOCK_N,
                       True, SOFTCAP)
    _store_rows(DQ + start_q * stride_dqt + head * stride_dqh, rows, seqlen_q, stride_dqt, offs_d,
                (dq * sm_scale).to(DQ.dtype.element_ty), HEAD_DIM, D_PAD)
