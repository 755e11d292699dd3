"""Load the HF model and tokenizer; run the decoder to final hidden states for the fused loss."""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mftcore.errors import ConfigError
from mftcore.model.attention import ATTN_IMPLEMENTATION, varlen_kwargs  # registers "mftcore_varlen"

# Backends that take the Batch's segments as cu_seqlens kwargs instead of an attention mask.
VARLEN_BACKENDS = (ATTN_IMPLEMENTATION, "flash_attention_2")


def load_tokenizer(cfg):
    path = cfg.tokenizer_path or cfg.pretrained_model_path
    if not os.path.isdir(path):
        raise ConfigError(f"tokenizer_path: {path}: not a directory")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer_path: {path}: the tokenizer has no eos_token")
    return tok


def load_model(cfg, vocab_size: int):
    """From pretrained_model_path (safetensors only), or randomly initialised from model_config."""
    kwargs = dict(attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    if cfg.pretrained_model_path is not None:
        if not os.path.isdir(cfg.pretrained_model_path):
            raise ConfigError(f"pretrained_model_path: {cfg.pretrained_model_path}: not a directory")
        return AutoModelForCausalLM.from_pretrained(
            cfg.pretrained_model_path, dtype=torch.float32, use_safetensors=True, **kwargs)
    spec = dict(cfg.model_config)
    model_type = spec.pop("model_type")
    spec.setdefault("vocab_size", vocab_size)
    try:
        config = AutoConfig.for_model(model_type, **spec)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model_config: {e}") from None
    return AutoModelForCausalLM.from_config(config, **kwargs)


def decoder(model):
    """The model without its LM head (LlamaModel inside LlamaForCausalLM, and so on)."""
    return getattr(model, model.base_model_prefix)


def hidden_states(model, batch) -> torch.Tensor:
    """Final hidden states [B, L, H] of the batch; the LM head is applied inside the fused loss."""
    segments = dict(attention_mask=batch.attention_mask)
    if model.config._attn_implementation in VARLEN_BACKENDS:
        segments = varlen_kwargs(batch)  # documents (and padding runs) from cu_seqlens: no mask
    out = decoder(model)(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **segments)
    return out.last_hidden_state
