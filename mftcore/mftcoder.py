"""MFTCoder compatibility: what of its config keys and command-line flags mftcore reads differently.

`normalise(raw)` runs on every config dict before TrainConfig sees it, so that MFTCoder's configs
(mftcoder_accelerate/src/pefts/mft_arguments.py) load unchanged:
  - LEGACY keys do nothing in mftcore: each value is checked (a value mftcore deliberately does not
    support is a one-line error naming the key) and the key is dropped, so it never reaches a
    TrainConfig, a checkpoint's saved config or the code;
  - MFTCoder's spellings: "[a,b]" strings for lists, "FSDP"/"DeepSpeed" for distributed_type;
  - model types that MFTCoder runs from model code copied into its repository are refused.
`TRAIN_FLAGS` are the flags of its `mft_accelerate.py` launch line, each the config keys it overrides.
"""

from __future__ import annotations

from typing import Callable, Optional

from mftcore.errors import ConfigError

TRAIN_FLAGS = {
    "data_paths": ("data_paths",),
    "output_dir": ("output_dir",),
    "tb_dir": ("tb_dir",),
    "pretrained_model_path": ("pretrained_model_path",),
    "micro_batch_size": ("per_device_train_batch_size", "per_device_eval_batch_size"),
    "model_type": ("model_type",),
    "distributed_type": ("distributed_type",),
}

LIST_KEYS = ("data_paths", "task_weights", "target_modules", "data_weights")  # may be MFTCoder's "[a,b]" strings

# MFTCoder runs these from model code copied into its own repository; mftcore ships no model code.
REMOTE_CODE_ONLY = ("aquila2", "baichuan", "chatglm2", "chatglm3", "qwen")


def _number(text):
    try:
        return float(text)
    except ValueError:
        return text  # the type check names it


def _only(expected, hint: str) -> Callable[[object], Optional[str]]:
    return lambda v: None if v == expected else f"{v!r} is not supported; {hint}"


def _any(value) -> Optional[str]:
    return None


# key -> check(value) -> None, or why mftcore refuses the value. Every key is dropped after its check.
LEGACY = {
    "load_raw_dataset": _only(True, "only raw JSONL data is supported (true)"),
    "tokenize_mode": _only("sft", "only \"sft\" (loss on the assistant turns)"),
    "tokenizer_type": lambda v: None if str(v).lower() == "autotokenizer" else
    f"{v!r} is not supported; only \"AutoTokenizer\"",
    "use_dynamic_padding": lambda v: None if v is True else
    "false (pad every batch to seq_length) is not supported: padding to the longest sample gives the same "
    "loss with less compute",
    "model_parallel_size": _only(1, "tensor/model parallelism is not supported; only 1"),
    # "4bit" is what peft_type "qlora" does anyway; normalise() checks that the two agree.
    "quantization": lambda v: None if v in (None, "4bit") else
    f"{v!r} is not supported (null, or \"4bit\" with peft_type \"qlora\")",
    "low_cpu_mem_usage": _any,  # transformers >= 5 always loads weights without a random init first
    "use_random_sampler": _any,  # never read by MFTCoder; mftcore reshuffles every epoch
    "use_xformers": _any,  # the attention backend is attn_implementation
    "weight_by_num_documents": _any,  # read only by MFTCoder's pre-tokenized binary datasets
    "make_vocab_size_divisible_by": _any,  # MFTCoder computes a padded vocabulary size and never uses it
    "use_slow_tokenizer": _any,  # transformers >= 5 has one tokenizer backend
    "world_size": _any,  # the number of processes is torchrun's WORLD_SIZE (MFTCoder overwrites it too)
}


def parse_list(value, key: str, source: str = "config") -> list:
    """A JSON list, or MFTCoder's "[a,b]" string (brackets stripped, split on commas)."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        items = [p.strip().strip("\"'") for p in text.split(",")]
        items = [p for p in items if p]
        if items:
            return items
    raise ConfigError(f"{source}: {key}: expected a list or \"[a,b]\" string, got {value!r}")


def check_model_type(model_type, source: str = "config") -> None:
    if isinstance(model_type, str) and model_type.lower() in REMOTE_CODE_ONLY:
        raise ConfigError(
            f"{source}: model_type: {model_type!r} is not supported: MFTCoder runs it from model code copied "
            "into its repository, which mftcore does not ship (any causal LM that transformers implements "
            "works, e.g. llama, qwen2, starcoder2, deepseek)")


def normalise(raw: dict, source: str = "config") -> dict:
    """A copy of `raw` with MFTCoder's legacy keys checked and dropped and its spellings made ours."""
    out = dict(raw)
    for key, check in LEGACY.items():
        if key in out:
            problem = check(out.pop(key))
            if problem:
                raise ConfigError(f"{source}: {key}: {problem}")
    if raw.get("quantization") == "4bit" and out.get("peft_type") != "qlora":
        raise ConfigError(f"{source}: quantization: \"4bit\" quantization trains through adapters: set peft_type "
                          "to \"qlora\"")
    for key in LIST_KEYS:
        if out.get(key) and not (key == "target_modules" and out[key] == "all-linear"):
            out[key] = parse_list(out[key], key, source)
    for key in ("task_weights", "data_weights"):
        if isinstance(raw.get(key), str):  # "[1,2]": the weights arrive as text
            out[key] = [_number(w) for w in out[key]]
    if isinstance(out.get("distributed_type"), str):
        out["distributed_type"] = out["distributed_type"].lower()
    check_model_type(out.get("model_type"), source)
    return out
