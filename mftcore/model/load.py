"""Load the HF tokenizer and model a config names: from pretrained_model_path (safetensors only), or
randomly initialised from model_config; the attention backend resolved for this run."""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mftcore.errors import ConfigError
from mftcore.integrity import irregular_file, weights_problem
from mftcore.model.attention import ATTN_IMPLEMENTATION  # importing it registers "mftcore_varlen"
from mftcore.model.decoder import check_packed_windows
from mftcore.model.families import check_loss_compatible, check_model_matches, resolve_eos_token

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(cfg):
    key = "tokenizer_path" if cfg.tokenizer_path else "pretrained_model_path"
    path = cfg.tokenizer_path or cfg.pretrained_model_path
    tok = load_hf_tokenizer(path, key, cfg.trust_remote_code)
    if cfg.eos_token is not None:
        set_eos_token(tok, cfg.eos_token)
    eos = resolve_eos_token(tok, cfg.model_type)
    if eos is None:
        raise ConfigError(f"tokenizer_path: {path}: the tokenizer has no eos_token")
    tok.eos_token = eos
    return tok


def load_hf_tokenizer(path: str, key: str, trust_remote_code: bool = False):
    """AutoTokenizer.from_pretrained with its failures (no tokenizer files, a damaged tokenizer.json, code
    it would need to run) as one line naming `key`."""
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: {path}: not a directory")
    problem = irregular_file(path)
    if problem:
        raise ConfigError(f"{key}: {path}: {problem}")
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ConfigError(f"{key}: {path}: no tokenizer here (none of {', '.join(TOKENIZER_FILES[:3])}, ...)")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError, ... by tokenizer class
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise ConfigError(f"{key}: {path}: the tokenizer needs its own code; allow it with trust_remote_code "
                              "only if you trust it") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{key}: {path}: the tokenizer cannot be loaded ({type(e).__name__}: "
                          f"{first[:200]})") from None


def set_eos_token(tok, token: str) -> None:
    """Use `eos_token` (one token of the vocabulary) as EOS, for the answers' end and for padding."""
    token_id = tok.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tok.unk_token_id and token != tok.unk_token):
        raise ConfigError(f"eos_token: {token!r} is not a token of the tokenizer's vocabulary")
    tok.eos_token = token


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def resolve_attn_implementation(value, padding_mode: str, config=None) -> str:
    """null/"auto" -> mftcore_varlen for packed rows (documents must not see each other), else sdpa, or
    eager where the installed transformers has no sdpa for the model's class (Gemma2: `_supports_sdpa` is
    False, its attention softcap); flash_attention_2 where flash_attn is not installed -> mftcore_varlen
    (with a warning)."""
    if value in (None, "auto"):
        if padding_mode == "pack":
            return ATTN_IMPLEMENTATION
        return "sdpa" if config is None or supports_sdpa(config) else "eager"
    if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        # MFTCoder's configs ask for FA2; mftcore_varlen computes the same exact attention over the same
        # cu_seqlens, so those configs run unchanged where flash_attn cannot be installed.
        warnings.warn("attn_implementation: flash_attn is not installed; using mftcore_varlen instead")
        return ATTN_IMPLEMENTATION
    return value


def run_attn_implementation(cfg, config) -> str:
    """The run's backend for the model's config; packed rows on sdpa/eager need the family's sliding-window
    layout (a ConfigError naming attn_implementation before any weights load, not at the first step)."""
    attn = resolve_attn_implementation(cfg.attn_implementation, cfg.padding_mode, config)
    if cfg.padding_mode == "pack":
        check_packed_windows(config, attn)
    return attn


def supports_sdpa(config) -> bool:
    """Whether transformers' causal-LM class for the config runs on sdpa (True for a class it cannot name:
    loading then says what is wrong)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return True
    return bool(getattr(cls, "_supports_sdpa", True))


def load_model(cfg, vocab_size: int, dtype=torch.float32, quantization_config=None, device_map=None):
    """From pretrained_model_path (safetensors only), or randomly initialised from model_config."""
    kwargs = dict(trust_remote_code=cfg.trust_remote_code)
    if cfg.pretrained_model_path is not None:
        path = cfg.pretrained_model_path
        if not os.path.isdir(path):
            raise ConfigError(f"pretrained_model_path: {path}: not a directory")
        if irregular_file(path):
            raise ConfigError(f"pretrained_model_path: {path}: {irregular_file(path)}")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            check_model_matches(cfg.model_type, config)
            check_loss_compatible(config)
            kwargs["attn_implementation"] = run_attn_implementation(cfg, config)
            problem = weights_problem(path)  # truncated or missing weights: one line, not safetensors' error
            if problem:
                raise ConfigError(f"pretrained_model_path: {path}: {problem} (weights are read only from safetensors)")
            return AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, quantization_config=quantization_config,
                device_map=device_map, **kwargs)
        except OSError as e:  # no *.safetensors: we never unpickle weights (a .bin can run code)
            raise ConfigError(f"pretrained_model_path: {path}: {one_line(e)} (weights are read only from "
                              "safetensors)") from None
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            if "custom code" in str(e) or "trust_remote_code" in str(e):
                raise ConfigError(f"pretrained_model_path: {path}: the model needs its own code; set "
                                  f"trust_remote_code=true only if you trust it") from None
            raise ConfigError(f"pretrained_model_path: {path}: cannot be loaded ({type(e).__name__}: "
                              f"{one_line(e)[:300]})") from None
    config = config_from_spec(cfg.model_config, vocab_size)
    check_model_matches(cfg.model_type, config)
    check_loss_compatible(config)
    check_shapes(config)
    kwargs["attn_implementation"] = run_attn_implementation(cfg, config)
    try:
        return AutoModelForCausalLM.from_config(config, **kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, OverflowError, ZeroDivisionError) as e:
        # e.g. "The hidden size (100) is not a multiple of the number of attention heads (3)"
        raise ConfigError(f"model_config: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    except MemoryError:
        raise ConfigError("model_config: the model does not fit in memory (check its sizes)") from None


def config_from_spec(model_config: dict, vocab_size: int):
    """The HF config of a `model_config` spec (model_type + fields; vocab_size defaults to the tokenizer's)."""
    spec = dict(model_config)
    model_type = spec.pop("model_type")
    spec.setdefault("vocab_size", vocab_size)
    try:
        return AutoConfig.for_model(model_type, **spec)
    except Exception as e:  # ValueError, TypeError, huggingface_hub's StrictDataclassClassValidationError, ...
        raise ConfigError(f"model_config: {' '.join(str(e).split())[:300]}") from None


def check_model_config(cfg, vocab_size: int) -> None:
    """model_config, checked before the data is tokenized: the HF config is built and the model
    instantiated on the meta device (no memory, no weights), which raises what building it for real
    would (unknown model_type, heads that do not divide the hidden size, ...)."""
    if cfg.model_config is None or cfg.pretrained_model_path is not None:
        return
    config = config_from_spec(cfg.model_config, vocab_size)
    check_shapes(config)
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, OverflowError, ZeroDivisionError) as e:
        raise ConfigError(f"model_config: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None


SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_inner",
             "n_positions")


def check_shapes(config) -> None:
    """Sizes that every decoder needs to be positive integers, and heads that divide what they split: a
    model_config that breaks them fails deep inside transformers (or, for head counts, only in the first
    forward), so it is a one-line error here."""
    for key in SIZE_KEYS:
        value = getattr(config, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"model_config: {key} must be a positive integer, got {value!r}")
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None)
    if hidden and heads and getattr(config, "head_dim", None) is None and hidden % heads:
        raise ConfigError(f"model_config: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if heads and kv and heads % kv:
        raise ConfigError(f"model_config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")


def vocabulary_size(model) -> int:
    """Rows of the input embedding (and of the LM head, when it has its own): the ids a model accepts."""
    sizes = [model.get_input_embeddings().weight.shape[0]]
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        sizes.append(head.weight.shape[0])
    return min(sizes)


def check_vocabulary(model, tokenizer, report: dict | None = None, where: str = "tokenizer_path") -> None:
    """Every token id the model will see must index its embedding and its LM head. The fused loss takes
    labels in [0, V) as a precondition (kernels/cross_entropy.py does not check it on the GPU, where a
    check would read back to the host): out-of-range ids are refused here, when the data is loaded."""
    vocab = vocabulary_size(model)
    for name, r in (report or {}).items():
        if r.get("max_id", -1) >= vocab:
            raise ConfigError(f"{r['max_id_at']}: token id {r['max_id']} (task {name}) is outside the model's "
                              f"vocabulary of {vocab}: the tokenizer has {len(tokenizer)} tokens; use the model's own "
                              "tokenizer, or a model whose embedding covers the added tokens")
    if len(tokenizer) > vocab:
        added = [t for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if i >= vocab][:3]
        raise ConfigError(f"{where}: the tokenizer has {len(tokenizer)} tokens, the model's embedding {vocab} rows: "
                          f"ids from {vocab} on (e.g. {added}) would index past it; use the model's own tokenizer, "
                          "or resize the model's embeddings to the tokenizer first")
    eos = tokenizer.eos_token_id
    if eos is not None and eos >= vocab:
        raise ConfigError(f"{where}: eos_token {tokenizer.eos_token!r} has id {eos}, outside the model's vocabulary "
                          f"of {vocab}")
