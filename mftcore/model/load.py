"""Load the HF tokenizer and model a config names: from pretrained_model_path (safetensors only), or
randomly initialised from model_config; the attention backend resolved for this run."""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mftcore.errors import ConfigError
from mftcore.model.attention import ATTN_IMPLEMENTATION  # importing it registers "mftcore_varlen"
from mftcore.model.families import check_loss_compatible, check_model_matches, resolve_eos_token


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


def resolve_attn_implementation(value, padding_mode: str) -> str:
    """null/"auto" -> mftcore_varlen for packed rows (documents must not see each other), else sdpa;
    flash_attention_2 where flash_attn is not installed -> mftcore_varlen (with a warning)."""
    if value in (None, "auto"):
        return ATTN_IMPLEMENTATION if padding_mode == "pack" else "sdpa"
    if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        # MFTCoder's configs ask for FA2; mftcore_varlen computes the same exact attention over the same
        # cu_seqlens, so those configs run unchanged where flash_attn cannot be installed.
        warnings.warn("attn_implementation: flash_attn is not installed; using mftcore_varlen instead")
        return ATTN_IMPLEMENTATION
    return value


def load_model(cfg, vocab_size: int, dtype=torch.float32, quantization_config=None, device_map=None):
    """From pretrained_model_path (safetensors only), or randomly initialised from model_config."""
    kwargs = dict(attn_implementation=resolve_attn_implementation(cfg.attn_implementation, cfg.padding_mode),
                  trust_remote_code=cfg.trust_remote_code)
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
