"""PyTorch side of the varlen attention op: the per-segment SDPA reference and the segment check.

`varlen_attention_reference` is both the test oracle and the path of every input the Triton kernels do
not take (CPU tensors outside the interpreter, fp32 on CUDA; see varlen_attention.py). It reads cu_seqlens on the
host, one synchronisation per call, which the kernels avoid.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def check_segments(cu_seqlens, total_tokens: int, max_seqlen: Optional[int]) -> list:
    """cu_seqlens as a list after checking it rises from 0 to T with no segment over max_seqlen (syncs)."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != total_tokens or min(lengths) < 0:
        raise ValueError(f"cu_seqlens must rise from 0 to T={total_tokens}, got {bounds}")
    if max_seqlen is not None and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than a segment of {max(lengths)} tokens")
    return bounds


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen=None, *, causal=True, softmax_scale=None):
    """The oracle and the CPU path: SDPA on each segment alone (reads cu_seqlens on the host)."""
    bounds = check_segments(cu_seqlens, q.shape[0], max_seqlen)
    group = q.shape[1] // k.shape[1]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        qi, ki, vi = (x[a:b].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        if group > 1:
            ki, vi = ki.repeat_interleave(group, 0), vi.repeat_interleave(group, 0)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=softmax_scale).transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def varlen_attention_reference_backward(do, q, k, v, cu_seqlens, max_seqlen=None, *, causal=True, softmax_scale=None):
    """dq, dk, dv of varlen_attention_reference by the softmax-backward formulas per segment (fp32, or fp64
    for fp64 inputs): the backward of the reference path inside the custom op, where autograd is off.
    dS = P * (dP - rowsum(dP * P)); dQ = dS K s, dK = dS^T Q s, dV = P^T dO; GQA sums over each group."""
    bounds = check_segments(cu_seqlens, q.shape[0], max_seqlen)
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    group, scale = Hq // Hkv, D ** -0.5 if softmax_scale is None else softmax_scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        qi, ki, vi, doi = (x[a:b].transpose(0, 1).to(acc) for x in (q, k, v, do))  # [H, L, D]
        ki, vi = ki.repeat_interleave(group, 0), vi.repeat_interleave(group, 0)
        s = qi @ ki.transpose(1, 2) * scale
        if causal:
            s = s.masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        p = s.softmax(-1)
        dp = doi @ vi.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[a:b] = (ds @ ki * scale).transpose(0, 1)
        dk[a:b] = (ds.transpose(1, 2) @ qi * scale).view(Hkv, group, b - a, D).sum(1).transpose(0, 1)
        dv[a:b] = (p.transpose(1, 2) @ doi).view(Hkv, group, b - a, D).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
