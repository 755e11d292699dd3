"""Load the HF model and tokenizer; run the decoder to final hidden states for the fused loss."""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mftcore.errors import ConfigError


def load_tokenizer(cfg):
    path = cfg.tokenizer_path or cfg.pretrained_model_path
    if not os.path.isdir(path):
        raise ConfigError(f"tokenizer_path: {path}: not a directory")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer_path: {path}: the tokenizer has no eos_token")
    return tok


def load_model(cfg, vocab_size: int, dtype=torch.float32, quantization_config=None, device_map=None):
    """From pretrained_model_path (safetensors only), or randomly initialised from model_config."""
    kwargs = dict(attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    if cfg.pretrained_model_path is not None:
        path = cfg.pretrained_model_path
        if not os.path.isdir(path):
            raise ConfigError(f"pretrained_model_path: {path}: not a directory")
        try:
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
    return decoder(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, use_cache=False, **decoder_kwargs)


def hidden_states(model, batch) -> torch.Tensor:
    """Final hidden states [B, L, H] of the batch; the LM head is applied inside the fused loss."""
    return run_decoder(model, batch).last_hidden_state
