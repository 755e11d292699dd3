"""mftcore's varlen attention as an HF attention backend: attn_implementation="mftcore_varlen".

Importing this module registers `varlen_attention_forward` with transformers' AttentionInterface. The
decoder call passes the Batch's document boundaries through the model's **kwargs, under the
FlashAttention-style names transformers forwards untouched to every attention layer (cu_seq_lens_q/k,
max_length_q/k, see `varlen_kwargs`), so each layer runs `mftcore.kernels.varlen_attention` on the flat
[B*L, H, D] tensors: documents never attend to each other, and nothing is read back to the host (max_length
is a host int from the Batch).

The name is deliberately not registered with transformers' mask interface: `create_causal_mask` then
returns None at once, building no [B, 1, L, L] mask and skipping its packed-sequence detection from
position_ids (which would read a tensor on the host every forward).

Without those kwargs (generation, or a caller that does not pass them) each row is one whole causal
sequence (no padding: an attention_mask never reaches this backend), and a query shorter than its keys
(decoding with a KV cache) goes to transformers' SDPA path.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mftcore.errors import ConfigError
from mftcore.kernels import varlen_attention
from mftcore.kernels.dispatch import uses_triton

ATTN_IMPLEMENTATION = "mftcore_varlen"


def varlen_kwargs(batch) -> dict:
    """The decoder-call kwargs that carry the Batch's segments to every attention layer."""
    return dict(cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, softcap=None, is_causal=None, cu_seq_lens_q=None,
                             cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """HF attention function: query [B, Hq, L, D], key/value [B, Hkv, S, D] -> ([B, L, Hq, D], None)."""
    B, Hq, L, D = query.shape
    if cu_seq_lens_q is None and key.shape[2] != L:  # decoding against a cache: not a varlen problem
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    # Model features the kernel lacks are config mistakes for an mftcore run: one line, naming the key.
    if dropout:
        raise ConfigError(f"attn_implementation: {ATTN_IMPLEMENTATION} has no attention dropout and this model's "
                          f"is {dropout}; use sdpa")
    if softcap:
        raise ConfigError(f"attn_implementation: {ATTN_IMPLEMENTATION} has no logit softcapping; use eager")
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=query.device)
        max_length_q = L
    elif key.shape[2] != L:
        raise ValueError(f"{ATTN_IMPLEMENTATION} needs queries and keys of the same segments")
    if sliding_window is not None and max_length_q > sliding_window:
        raise ConfigError(f"attn_implementation: {ATTN_IMPLEMENTATION} has no sliding window, and this model's "
                          f"window ({sliding_window} tokens) is shorter than a document ({max_length_q}); use "
                          "sdpa or a seq_length within the window")
    q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], D) for x in (query, key, value))  # [B*L, H, D]
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):  # as SDPA does under autocast: run in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    elif q.is_cuda and not uses_triton(q):
        warnings.warn(f"{ATTN_IMPLEMENTATION}: {q.dtype} on CUDA runs the PyTorch reference (one host sync "
                      "per layer); use bf16/fp16 weights or autocast for the Triton kernels", stacklevel=2)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = varlen_attention(q, k, v, cu_seq_lens_q, int(max_length_q), causal=bool(causal), softmax_scale=scaling)
    return out.view(B, L, Hq, D), None


def register() -> None:
    """Make attn_implementation="mftcore_varlen" known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)


register()
