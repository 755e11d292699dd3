"""PyTorch side of the varlen attention op: the per-segment reference, its backward, and the segment checks.

`varlen_attention_reference` is both the test oracle and the path of every input the Triton kernels do
not take (CPU tensors outside the interpreter, fp32 on CUDA; see varlen_attention.py). It reads the
cu_seqlens on the host (`tolist`, one synchronisation per call), which the kernels avoid: on the CPU that
is a memory read, and on CUDA this path is the fp32 fallback only.

Semantics (flash-attn >= 2.1's varlen API): segment i holds queries cu_seqlens_q[i]:cu_seqlens_q[i+1] and
keys cu_seqlens_k[i]:cu_seqlens_k[i+1]. With lq queries and lk keys, query r sees key c iff
r + lk - lq - left <= c <= r + lk - lq + right (causal aligned bottom-right; -1 = unbounded side; causal
caps right at 0). A query that sees no key (lq > lk, causal) outputs 0 and has lse = -inf. softcap > 0
replaces each score s (after softmax_scale) by softcap * tanh(s / softcap), as Gemma2 does.
The plain case (equal q and k segments, causal or full, no window, no cap, no lse) is SDPA per segment,
as before these options existed: CPU training's numbers are unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

LOG2E = 1.4426950408889634


def check_segments(cu_seqlens, total_tokens: int, max_seqlen: Optional[int], name: str = "cu_seqlens") -> list:
    """cu_seqlens as a list after checking it rises from 0 to T with no segment over max_seqlen (syncs)."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != total_tokens or min(lengths) < 0:
        raise ValueError(f"{name} must rise from 0 to T={total_tokens}, got {bounds}")
    if max_seqlen is not None and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen{name[len('cu_seqlens'):]}={max_seqlen} is shorter than a segment of "
                         f"{max(lengths)} tokens")
    return bounds


def window_bounds(causal: bool, window_size) -> tuple[int, int]:
    """(left, right) keys a query sees around its bottom-right diagonal, -1 = unbounded (flash-attn's rule:
    causal makes right 0)."""
    left, right = (int(w) for w in window_size)
    return (-1 if left < 0 else left), (0 if causal else (-1 if right < 0 else right))


def segment_mask(lq: int, lk: int, left: int, right: int, device) -> torch.Tensor:
    """[lq, lk] bool: which keys each query of one segment sees."""
    rel = torch.arange(lq, device=device)[:, None] + (lk - lq)
    cols = torch.arange(lk, device=device)[None, :]
    mask = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= cols <= rel + right
    if left >= 0:
        mask &= cols >= rel - left
    return mask


def segments(q, k, cu_q, cu_k, max_q, max_k) -> list:
    """[(q start, q end, k start, k end)] of every segment (one host read of each cu_seqlens)."""
    bq = check_segments(cu_q, q.shape[0], max_q)
    bk = bq if cu_k is None else check_segments(cu_k, k.shape[0], max_k, "cu_seqlens_k")
    if len(bk) != len(bq):
        raise ValueError(f"cu_seqlens_k has {len(bk) - 1} segments and cu_seqlens {len(bq) - 1}")
    return [(a, b, c, d) for a, b, c, d in zip(bq, bq[1:], bk, bk[1:])]


def probabilities(qi, ki, scale: float, softcap: float, mask):
    """Softmax over each query's visible keys ([H, lq, lk], 0 where none) and the capped scores' tanh."""
    s = qi @ ki.transpose(1, 2) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = t * softcap
    empty = ~mask.any(-1)  # queries that see no key: a finite row (0s) in the softmax, then zeroed
    s = s.masked_fill(~mask | empty[:, None], float("-inf")).masked_fill(empty[:, None], 0.0)
    lse = torch.logsumexp(s, -1).masked_fill(empty, float("-inf"))
    return s.softmax(-1).masked_fill(empty[:, None], 0.0), lse, t


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen=None, *, causal=True, softmax_scale=None,
                               cu_seqlens_k=None, max_seqlen_k=None, window_size=(-1, -1), softcap=0.0,
                               return_lse=False):
    """The oracle and the CPU path, each segment alone: o [Tq, Hq, D], and with return_lse also the natural
    log-sum-exp [Tq, Hq] in fp32 (carrying no gradient, as on the Triton path)."""
    left, right = window_bounds(causal, window_size)
    segs = segments(q, k, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k)
    group = q.shape[1] // k.shape[1]
    scale = q.shape[2] ** -0.5 if softmax_scale is None else softmax_scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for a, b, c, d in segs:
        if a == b:
            continue
        qi, ki, vi = q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)  # [H, L, D]
        if group > 1:
            ki, vi = ki.repeat_interleave(group, 0), vi.repeat_interleave(group, 0)
        if b - a == d - c and left < 0 and right <= 0 and not softcap and not return_lse:
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=right == 0, scale=scale).transpose(0, 1))
            continue
        p, lse, _ = probabilities(qi.to(acc), ki.to(acc), scale, softcap, segment_mask(b - a, d - c, left, right,
                                                                                      q.device))
        outs.append((p @ vi.to(acc)).to(q.dtype).transpose(0, 1))
        lses.append(lse.float().transpose(0, 1))
    o = torch.cat(outs) if outs else q.new_zeros(q.shape)
    if not return_lse:
        return o
    return o, (torch.cat(lses) if lses else q.new_empty((0, q.shape[1]), dtype=torch.float32)).detach()


def varlen_attention_reference_backward(do, q, k, v, cu_seqlens, max_seqlen=None, *, causal=True,
                                        softmax_scale=None, cu_seqlens_k=None, max_seqlen_k=None,
                                        window_size=(-1, -1), softcap=0.0):
    """dq, dk, dv of varlen_attention_reference by the softmax-backward formulas per segment (fp32, or fp64
    for fp64 inputs): the backward of the reference path inside the custom op, where autograd is off.
    dS = P * (dP - rowsum(dP * P)), times 1 - tanh^2 under a softcap; dQ = dS K s, dK = dS^T Q s,
    dV = P^T dO; GQA sums over each group."""
    left, right = window_bounds(causal, window_size)
    segs = segments(q, k, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k)
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    group, scale = Hq // Hkv, D ** -0.5 if softmax_scale is None else softmax_scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    for a, b, c, d in segs:
        if a == b or c == d:
            continue
        qi, doi = (x[a:b].transpose(0, 1).to(acc) for x in (q, do))  # [H, L, D]
        ki, vi = (x[c:d].transpose(0, 1).to(acc).repeat_interleave(group, 0) for x in (k, v))
        p, _, t = probabilities(qi, ki, scale, softcap, segment_mask(b - a, d - c, left, right, q.device))
        dp = doi @ vi.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        if softcap:
            ds = ds * (1 - t * t)
        dq[a:b] = (ds @ ki * scale).transpose(0, 1)
        dk[c:d] = (ds.transpose(1, 2) @ qi * scale).view(Hkv, group, d - c, D).sum(1).transpose(0, 1)
        dv[c:d] = (p.transpose(1, 2) @ doi).view(Hkv, group, d - c, D).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
