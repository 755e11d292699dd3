"""Run an HF causal LM's decoder on a Batch to final hidden states; the LM head is applied inside the
fused loss, so the N x V logits never exist."""

from __future__ import annotations

import torch

from mftcore.model.attention import ATTN_IMPLEMENTATION, varlen_kwargs

# Backends that take the Batch's segments as cu_seqlens kwargs instead of an attention mask.
VARLEN_BACKENDS = (ATTN_IMPLEMENTATION, "flash_attention_2")


def causal_lm(model):
    """The HF causal LM itself: a PeftModel keeps it (with the adapters injected) under base_model.model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def decoder(model):
    """The model without its LM head (LlamaModel inside LlamaForCausalLM, and so on)."""
    lm = causal_lm(model)
    return getattr(lm, lm.base_model_prefix)


def lm_head(model):
    """The output projection whose weight the fused loss multiplies by."""
    return causal_lm(model).get_output_embeddings()


def run_decoder(model, batch, **decoder_kwargs):
    """The decoder's HF output for the batch (router logits too with output_router_logits=True)."""
    lm = causal_lm(model)
    backend = lm.config._attn_implementation
    if backend in VARLEN_BACKENDS:  # documents (and padding runs) from cu_seqlens: no mask at all
        segments = varlen_kwargs(batch)
    elif batch.attention_mask is not None:
        segments = dict(attention_mask=batch.attention_mask)
    else:  # packed rows on the stock backends: a block-diagonal mask keeps documents apart
        segments = dict(attention_mask=packed_attention_mask(batch, backend, lm.dtype))
    return decoder(model)(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                          **segments, **decoder_kwargs)


def hidden_states(model, batch) -> torch.Tensor:
    """Final hidden states [B, L, H] of the batch."""
    return run_decoder(model, batch).last_hidden_state


def packed_attention_mask(batch, attn_implementation: str, dtype: torch.dtype):
    """Block-diagonal causal mask [B, 1, L, L] from cu_seqlens, so that the stock sdpa/eager backends
    keep each packed document (and each padding run) to itself: transformers passes a 4D mask
    through unchanged. Correct but O(L^2) memory per row; a varlen backend needs no mask (None)."""
    if attn_implementation not in ("sdpa", "eager"):
        return None
    B, L = batch.input_ids.shape
    flat = torch.arange(B * L, device=batch.input_ids.device)
    segment = torch.searchsorted(batch.cu_seqlens[1:].to(flat.device, torch.long), flat, right=True).view(B, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=flat.device).tril()
    allowed = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    if attn_implementation == "sdpa":
        return allowed  # boolean: True = may attend
    return torch.zeros(allowed.shape, dtype=dtype, device=flat.device).masked_fill(~allowed, torch.finfo(dtype).min)
