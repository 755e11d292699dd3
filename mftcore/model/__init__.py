"""Load the HF model and tokenizer; run the decoder to final hidden states for the fused loss."""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mftcore.errors import ConfigError
from mftcore.model.families import check_loss_compatible, check_model_matches, resolve_eos_token
from mftcore.model.attention import ATTN_IMPLEMENTATION, varlen_kwargs  # registers "mftcore_varlen"

# Backends that take the Batch's segments as cu_seqlens kwargs instead of an attention mask.
VARLEN_BACKENDS = (ATTN_IMPLEMENTATION, "flash_attention_2")


def load_tokenizer(cfg):
    path = cfg.tokenizer_path or cfg.pretrained_model_path
    if not os.path.isdir(path):
        raise ConfigError(f"tokenizer_path: {path}: not a directory")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if cfg.eos_token is not None:
        set_eos_token(tok, cfg.eos_token)
    eos = resolve_eos_token(tok, cfg.model_type)
    if eos is None:
        raise ConfigError(f"tokenizer_path: {path}: the tokenizer has no eos_token")
    tok.eos_token = eos
    return tok


def set_eos_token(tok, token: str) -> None:
    """Use `eos_token` (one token of the vocabulary) as EOS, for the answers' end and for padding."""
    token_id = tok.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tok.unk_token_id and token != tok.unk_token):
        raise ConfigError(f"eos_token: {token!r} is not a token of the tokenizer's vocabulary")
    tok.eos_token = token


def load_model(cfg, vocab_size: int, dtype=torch.float32, quantization_config=None, device_map=None):
    """From pretrained_model_path (safetensors only), or randomly initialised from model_config."""
    kwargs = dict(attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    if cfg.pretrained_model_path is not None:
        path = cfg.pretrained_model_path
        if not os.path.isdir(path):
            raise ConfigError(f"pretrained_model_path: {path}: not a directory")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            check_model_matches(cfg.model_type, config)
            check_loss_compatible(config)
            return AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, quantization_config=quantization_config,
                device_map=device_map, **kwargs)
        except OSError as e:  # no *.safetensors: we never unpickle weights (a .bin can run code)
            raise ConfigError(f"pretrained_model_path: {path}: {e} (weights are read only from safetensors)") from None
        except ValueError as e:
            if "custom code" in str(e):
                raise ConfigError(f"pretrained_model_path: {path}: the model needs its own code; set "
                                  f"trust_remote_code=true only if you trust it") from None
            raise
    spec = dict(cfg.model_config)
    model_type = spec.pop("model_type")
    spec.setdefault("vocab_size", vocab_size)
    try:
        config = AutoConfig.for_model(model_type, **spec)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model_config: {e}") from None
    check_model_matches(cfg.model_type, config)
    check_loss_compatible(config)
    return AutoModelForCausalLM.from_config(config, **kwargs)


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
    """Final hidden states [B, L, H] of the batch; the LM head is applied inside the fused loss."""
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
