"""Tiny models of every family, built from configs (no downloads), for the family, merge and generate tests."""


import torch

from tests.helpers.paths import TOKENIZER  # noqa: F401 (re-exported for the family tests)

COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 256}

# model_type (MFTCoder's name) -> HF model_config for a randomly initialised model of that family.
TINY_CONFIGS = {
    "llama": {"model_type": "llama", **COMMON},
    "code_llama": {"model_type": "llama", **COMMON, "rope_theta": 1e6},
    "deepseek": {"model_type": "llama", **COMMON},
    "mistral": {"model_type": "mistral", **COMMON, "sliding_window": 64},
    "mixtral": {"model_type": "mixtral", **COMMON, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {"model_type": "qwen2", **COMMON},
    "qwen2_moe": {"model_type": "qwen2_moe", **COMMON, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64},
    "starcoder2": {"model_type": "starcoder2", **COMMON, "bos_token_id": 0, "eos_token_id": 0},
    "gpt_bigcode": {"model_type": "gpt_bigcode", "n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4,
                    "n_positions": 256, "bos_token_id": 0, "eos_token_id": 0},
    "gpt_neox": {"model_type": "gpt_neox", **COMMON, "rotary_pct": 0.25, "bos_token_id": 0, "eos_token_id": 0},
    "phi": {"model_type": "phi", **COMMON, "bos_token_id": 0, "eos_token_id": 0},
    "gemma": {"model_type": "gemma", **COMMON, "head_dim": 16},
    # a soft-cap low enough to bind on a random tiny model's logits (released models: 30)
    "gemma2": {"model_type": "gemma2", **COMMON, "head_dim": 16, "final_logit_softcapping": 0.5,
               "sliding_window": 64},
    # logit_scale 4 (released models: 0.0625) so that a missed scale would show in the loss
    "cohere": {"model_type": "cohere", **COMMON, "logit_scale": 4.0, "bos_token_id": 0, "eos_token_id": 0},
}


def build_tiny(model_type: str, vocab_size: int, seed: int = 0):
    """A randomly initialised tiny model of the family, in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[model_type])
    hf_type = spec.pop("model_type")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(hf_type, vocab_size=vocab_size, **spec))


def save_tiny_llama(path: str, tokenizer, seed: int = 0) -> str:
    """A tiny Llama with the sample tokenizer, saved as an HF model directory (safetensors)."""
    model = build_tiny("llama", len(tokenizer), seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
