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

The model's sliding window and attention-logit softcap go to the kernel: HF's `sliding_window` counts the
current token (masking_utils: key > query - sliding_window, the same for Mistral, Qwen2, Starcoder2 and
Gemma2 in transformers 5), so it is window_size=(sliding_window - 1, sliding_window - 1) as in HF's
flash-attention path (causal makes the right side 0). Each layer passes its own window (None on Qwen2's
and Gemma2's full-attention layers, from config.layer_types), so alternating layers need nothing here.

Without those kwargs (generation, or a caller that does not pass them) each row is one whole causal
sequence (no padding: an attention_mask never reaches this backend). A query shorter than its keys
(decoding with a KV cache) goes to transformers' SDPA path as before, unless the layer has a sliding window
or a softcap, which SDPA without a mask would drop: then it is one segment per row of L queries and S keys,
causal aligned bottom-right (the kernel's separate q/k segments), so Gemma2 and windowed models generate
right too.
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
    S = key.shape[2]
    if cu_seq_lens_q is None and S != L and sliding_window is None and not softcap:  # plain decoding step
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    # Model features the kernel lacks are config mistakes for an mftcore run: one line, naming the key.
    if dropout:
        raise ConfigError(f"attn_implementation: {ATTN_IMPLEMENTATION} has no attention dropout and this model's "
                          f"is {dropout}; use sdpa")
    if cu_seq_lens_q is None:  # one sequence per row; with a KV cache, L queries at the end of S keys
        cu_seq_lens_q = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=query.device)
        cu_seq_lens_k = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=query.device)
        max_length_q, max_length_k = L, S
    elif cu_seq_lens_k is None or max_length_k is None:
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    window = (-1, -1) if sliding_window is None else (int(sliding_window) - 1, int(sliding_window) - 1)
    q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], D) for x in (query, key, value))  # [B*L, H, D]
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):  # as SDPA does under autocast: run in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    elif q.is_cuda and not uses_triton(q):
        warnings.warn(f"{ATTN_IMPLEMENTATION}: {q.dtype} on CUDA runs the PyTorch reference (one host sync "
                      "per layer); use bf16/fp16 weights or autocast for the Triton kernels", stacklevel=2)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    separate = cu_seq_lens_k is not cu_seq_lens_q
    out = varlen_attention(q, k, v, cu_seq_lens_q, int(max_length_q), causal=bool(causal), softmax_scale=scaling,
                           window_size=window, softcap=float(softcap or 0.0),
                           cu_seqlens_k=cu_seq_lens_k if separate else None,
                           max_seqlen_k=int(max_length_k) if separate else None)
    return out.view(B, L, Hq, D), None


def register() -> None:
    """Make attn_implementation="mftcore_varlen" known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)


register()
