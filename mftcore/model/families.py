"""Model families: what mftcore needs to know per `model_type` that the HF config does not say.

`model_type` is MFTCoder's name for the family (its `utils/model_mapping.py`), which is not always the
HF config's `model_type`: code_llama and deepseek (DeepSeek-Coder v1) are Llama architectures, and
MFTCoder's "starcoder" is HF's gpt_bigcode. Each entry gives
- the EOS token the family's released tokenizers use (the fallback when a tokenizer has none);
- the LoRA target modules: every linear layer of the decoder except the LM head and MoE routers
  (MFTCoder's "all-linear"), spelled out so that adapters name the same modules on every version;
- the decoder-layer class, the unit that FSDP wraps and activation checkpointing recomputes.
Heads that transform their logits (Gemma2's final soft-cap, Cohere's logit_scale, Granite's logits_scaling)
are applied by the fused loss itself (`loss_options`), so those families train without logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from mftcore.errors import ConfigError

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    hf_model_types: tuple  # the HF config model_type values this family's checkpoints carry
    eos_token: str
    lora_targets: tuple
    decoder_layer: str  # class name of one decoder layer


FAMILIES = {
    "llama": Family(("llama",), "</s>", ATTN + GATED_MLP, "LlamaDecoderLayer"),
    "code_llama": Family(("llama",), "</s>", ATTN + GATED_MLP, "LlamaDecoderLayer"),
    "deepseek": Family(("llama",), "<｜end▁of▁sentence｜>", ATTN + GATED_MLP, "LlamaDecoderLayer"),
    "mistral": Family(("mistral",), "</s>", ATTN + GATED_MLP, "MistralDecoderLayer"),
    # transformers 5 holds the experts as fused 3-D parameters, not nn.Linear: LoRA reaches attention only.
    "mixtral": Family(("mixtral",), "</s>", ATTN, "MixtralDecoderLayer"),
    "qwen2": Family(("qwen2",), "<|endoftext|>", ATTN + GATED_MLP, "Qwen2DecoderLayer"),
    # gate/up/down_proj here are the shared expert's; the routed experts are fused like Mixtral's.
    "qwen2_moe": Family(("qwen2_moe",), "<|endoftext|>", ATTN + GATED_MLP, "Qwen2MoeDecoderLayer"),
    "starcoder2": Family(("starcoder2",), "<|endoftext|>", ATTN + ("c_fc", "c_proj"), "Starcoder2DecoderLayer"),
    "gpt_bigcode": Family(("gpt_bigcode",), "<|endoftext|>", ("c_attn", "c_proj", "c_fc"), "GPTBigCodeBlock"),
    "gpt_neox": Family(("gpt_neox",), "<|endoftext|>",
                       ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), "GPTNeoXLayer"),
    "phi": Family(("phi",), "<|endoftext|>", ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
                  "PhiDecoderLayer"),
    "gemma": Family(("gemma",), "<eos>", ATTN + GATED_MLP, "GemmaDecoderLayer"),
    # final_logit_softcapping (30 on the released models): the fused loss soft-caps its logits.
    "gemma2": Family(("gemma2",), "<eos>", ATTN + GATED_MLP, "Gemma2DecoderLayer"),
    # Command-R: logits times logit_scale (0.0625 on the released models), applied by the fused loss.
    "cohere": Family(("cohere",), "<|END_OF_TURN_TOKEN|>", ATTN + GATED_MLP, "CohereDecoderLayer"),
}

# MFTCoder's spellings of the same families.
ALIASES = {"starcoder": "gpt_bigcode"}


def canonical(model_type: str | None) -> str | None:
    """MFTCoder's model_type spelling -> the key of FAMILIES (unknown types pass through, lower-cased)."""
    if model_type is None:
        return None
    name = model_type.lower()
    return ALIASES.get(name, name)


def get_family(model_type: str | None) -> Family | None:
    """The family's entry, or None for a model_type outside the table (generic handling)."""
    return FAMILIES.get(canonical(model_type))


def check_model_matches(model_type: str | None, config) -> None:
    """model_type must name the family of the checkpoint (MFTCoder would silently load the wrong class)."""
    family = get_family(model_type)
    if family is not None and config.model_type not in family.hf_model_types:
        raise ConfigError(f"model_type: {model_type!r} expects a {'/'.join(family.hf_model_types)} checkpoint, "
                          f"but the model's config.json says model_type {config.model_type!r}")


def loss_options(config) -> dict:
    """The fused loss's softcap / logit_scale keywords that reproduce the HF head's logits transform:
    Gemma2/3's final_logit_softcapping, Cohere's logit_scale (a multiplier), Granite's logits_scaling (a
    divisor). {} for a plain head."""
    out = {}
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        out["softcap"] = float(softcap)
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    if scale != 1.0:
        out["logit_scale"] = scale
    return out


def check_loss_compatible(config) -> None:
    """The head's logit transform must be one the fused loss applies: a positive soft-cap and scale."""
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, key, None)
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ConfigError(f"model: {config.model_type} has {key}={value!r}; the fused cross-entropy "
                              "applies a positive soft-cap or logit scale only")


def lora_target_modules(model_type: str | None):
    """The family's LoRA targets, or "all-linear" (peft's every-linear-but-the-head) outside the table."""
    family = get_family(model_type)
    return list(family.lora_targets) if family is not None else "all-linear"


def decoder_layer_class(model, model_type: str | None = None) -> type:
    """The class of the model's decoder layers: the family's, else the first of `_no_split_modules`."""
    family = get_family(model_type)
    names = [family.decoder_layer] if family is not None else list(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in names:
            return type(module)
    raise ConfigError(f"model_type: no decoder layer class ({', '.join(names) or 'none declared'}) "
                      f"found in {type(model).__name__}")


def resolve_eos_token(tokenizer, model_type: str | None) -> str | None:
    """The tokenizer's EOS, else the family's when the vocabulary has it (as MFTCoder falls back to config)."""
    if tokenizer.eos_token is not None:
        return tokenizer.eos_token
    family = get_family(model_type)
    if family is not None and family.eos_token in tokenizer.get_vocab():
        return family.eos_token
    return None
