"""Run an HF causal LM's decoder on a Batch to final hidden states; the LM head is applied inside the
fused loss, so the N x V logits never exist."""

from __future__ import annotations

import torch

from mftcore.errors import ConfigError
from mftcore.model.attention import ATTN_IMPLEMENTATION, varlen_kwargs

# Backends that take the Batch's segments as cu_seqlens kwargs instead of an attention mask.
VARLEN_BACKENDS = (ATTN_IMPLEMENTATION, "flash_attention_2")

# How a windowed family's decoder takes a ready 4D mask in transformers 5 (tests/model/test_packed_windows.py
# checks both lists against the installed transformers' source): one mask for every layer, each layer sliding
# by config.sliding_window ...
ONE_WINDOW_FAMILIES = ("mistral", "mixtral", "starcoder2")
# ... or a dict keyed by layer type, layer i taking the mask of config.layer_types[i].
LAYER_TYPE_FAMILIES = ("qwen2", "qwen2_moe", "gemma2")


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
        segments = dict(attention_mask=packed_attention_mask(batch, backend, lm.dtype, lm.config))
    return decoder(model)(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                          **segments, **decoder_kwargs)


def hidden_states(model, batch) -> torch.Tensor:
    """Final hidden states [B, L, H] of the batch."""
    return run_decoder(model, batch).last_hidden_state


def layer_windows(config) -> list | None:
    """Each decoder layer's sliding window in tokens, the current one counted (None: full attention), as
    transformers applies it; None where a windowed family is in neither list above (layout unknown here)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return [None] * config.num_hidden_layers
    if config.model_type in ONE_WINDOW_FAMILIES:
        return [int(window)] * config.num_hidden_layers
    if config.model_type in LAYER_TYPE_FAMILIES and getattr(config, "layer_types", None):
        return [int(window) if kind == "sliding_attention" else None for kind in config.layer_types]
    return None


def check_packed_windows(config, attn_implementation: str) -> None:
    """Packed rows on sdpa/eager need the family's window layout (see packed_attention_mask)."""
    if attn_implementation in ("sdpa", "eager") and layer_windows(config) is None:
        raise ConfigError(f"attn_implementation: {attn_implementation} cannot keep packed rows of a "
                          f"{config.model_type} model inside its sliding_window={config.sliding_window}; use "
                          "mftcore_varlen (or padding_mode: padding)")


def packed_attention_mask(batch, attn_implementation: str, dtype: torch.dtype, config=None):
    """Block-diagonal causal mask [B, 1, L, L] from cu_seqlens, so that the stock sdpa/eager backends
    keep each packed document (and each padding run) to itself: transformers passes a 4D mask
    through unchanged, so the mask must also carry the model's sliding windows (HF's convention: the window
    counts the current token, key > query - sliding_window). One mask where every layer has the same
    window; {layer_type: mask} where they differ (LAYER_TYPE_FAMILIES: Qwen2, Gemma2); any other windowed
    model is a ConfigError naming attn_implementation (never a silently unwindowed mask).
    Correct but O(L^2) memory per row; a varlen backend needs no mask (None)."""
    if attn_implementation not in ("sdpa", "eager"):
        return None
    if config is None:
        return _block_causal(batch, attn_implementation, dtype, None)
    check_packed_windows(config, attn_implementation)
    windows = layer_windows(config)
    if len(set(windows)) == 1:
        return _block_causal(batch, attn_implementation, dtype, windows[0])
    by_kind = dict(zip(config.layer_types, windows))
    return {kind: _block_causal(batch, attn_implementation, dtype, w) for kind, w in by_kind.items()}


def _block_causal(batch, attn_implementation: str, dtype: torch.dtype, window):
    """The block-diagonal causal mask, windowed to `window` keys (the current one included) when given:
    bool for sdpa (True = may attend), additive for eager."""
    B, L = batch.input_ids.shape
    flat = torch.arange(B * L, device=batch.input_ids.device)
    segment = torch.searchsorted(batch.cu_seqlens[1:].to(flat.device, torch.long), flat, right=True).view(B, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=flat.device).tril()
    if window is not None:
        causal = causal.triu(1 - window)  # key > query - window
    allowed = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=flat.device).masked_fill(~allowed, torch.finfo(dtype).min)
