"""Merge a LoRA / QLoRA adapter into its base model: one HF safetensors directory, ready to serve.

    mftcore merge --base BASE --adapter ADAPTER --out MERGED [--model_type llama] [--dtype bfloat16]

MFTCoder's flag names (--base_model_or_path, --adaptor_path, --merged_output_path) work too. The base
is loaded unquantised, so an adapter trained on a 4-bit (QLoRA) base merges into full-precision
weights, as MFTCoder does. The tokenizer is saved with a chat template that renders the training
string with the role markers the adapter was trained with (its mftcore_config.json, else the base's,
else MFTCoder's defaults), and that config is saved beside the model for `mftcore generate`.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from mftcore.errors import ConfigError
from mftcore.integrity import irregular_file, weights_problem
from mftcore.io import CONFIG_FILE, atomic_dir, atomic_write_json, read_json_object
from mftcore.mftcoder import check_model_type
from mftcore.model.chat_template import saved_chat_format, set_training_template
from mftcore.model.families import check_model_matches, resolve_eos_token
from mftcore.model.load import load_hf_tokenizer
from mftcore.outputs import check_output, is_model_dir

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_inputs(base: str, adapter: str, out: str) -> None:
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise ConfigError(f"--base: {base}: no config.json (not an HF model directory)")
    for flag, d in (("--base", base), ("--adapter", adapter)):
        if os.path.isdir(d) and irregular_file(d):
            raise ConfigError(f"{flag}: {d}: {irregular_file(d)}")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise ConfigError(f"--adapter: {adapter}: no adapter_config.json (not a PEFT adapter directory)")
    problem = weights_problem(adapter) if os.path.exists(os.path.join(adapter, "adapter_model.safetensors")) else None
    if problem:
        raise ConfigError(f"--adapter: {adapter}: {problem}")
    # --out must not be, contain or (existing) lie inside an input or a training run (mftcore/outputs.py)
    check_output(out, "--out", {"base model": base, "adapter": adapter}, replaceable=is_model_dir)


@contextlib.contextmanager
def load_errors(path: str, flag: str = "--base"):
    """transformers' failures to read the model at `path` (given as `flag`) as one line (custom code it may
    not run included)."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise ConfigError(f"{flag}: {path}: the model needs its own code; pass --trust_remote_code only if "
                              "you trust it") from None
        raise ConfigError(f"{flag}: {path}: cannot be loaded ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None


def apply_adapter(model, adapter: str, base: str):
    """PeftModel of `model` with the adapter; an adapter made for another base is a one-line ConfigError."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names of another base model
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # torch: "Error(s) in ...:\n\tsize..."
        raise ConfigError(f"--adapter: {adapter}: does not fit the base model {base}: {first[:300]}") from None


def load_merge_tokenizer(base: str, adapter: str, model_type: str | None, trust_remote_code: bool):
    """The adapter's tokenizer when it saved one (training may have set EOS), else the base's."""
    source = adapter if os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base
    tokenizer = load_hf_tokenizer(source, "--adapter" if source == adapter else "--base", trust_remote_code)
    eos = resolve_eos_token(tokenizer, model_type)
    if eos is None:
        raise ConfigError(f"--base: {source}: the tokenizer has no eos_token (and --model_type gives none)")
    tokenizer.eos_token = eos
    return tokenizer


def merge(base: str, adapter: str, out: str, model_type: str | None = None, dtype: str = "auto",
          trust_remote_code: bool = False, log=None) -> str:
    """Write base + adapter, merged, to `out` (atomically: a temporary directory renamed at the end)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_inputs(base, adapter, out)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    check_model_type(model_type, "--model_type")
    with load_errors(base):
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    check_model_matches(model_type, config)
    tokenizer = load_merge_tokenizer(base, adapter, model_type, trust_remote_code)
    chat_format, markers, markers_from = saved_chat_format(adapter, base)
    problem = weights_problem(base)
    if problem:
        raise ConfigError(f"--base: {base}: {problem}")

    log(f"loading {base} ({dtype})")
    with load_errors(base):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype], use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    log(f"merging {adapter}")
    merged = apply_adapter(model, adapter, base).merge_and_unload()
    set_training_template(tokenizer, chat_format, markers)

    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        saved = read_json_object(markers_from) if markers_from is not None else {}
        saved["role_markers"] = markers
        atomic_write_json(os.path.join(tmp, CONFIG_FILE), saved, indent=2)
    log(f"saved {out} (role markers from {markers_from or 'MFTCoder defaults'})")
    return out
