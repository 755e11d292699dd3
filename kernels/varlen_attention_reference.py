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
