"""Answer prompts with a trained model, in its training format (`<s>human\\n{q}\\n<s>bot\\n`)."""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mftcore.config import DEFAULT_ROLE_MARKERS
from mftcore.data.render import render_prompt
from mftcore.errors import ConfigError


def role_markers(model_dir: str) -> dict:
    """The markers the model was trained with (saved beside it by `train`), else MFTCoder's defaults."""
    path = os.path.join(model_dir, "mftcore_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return {**DEFAULT_ROLE_MARKERS, **(json.load(f).get("role_markers") or {})}
    return dict(DEFAULT_ROLE_MARKERS)


def generate(model_dir: str, prompt: str, max_new_tokens: int = 128, system: str | None = None) -> str:
    """Greedy continuation of one prompt, stopping at the tokenizer's EOS."""
    if not os.path.isdir(model_dir):
        raise ConfigError(f"--model: {model_dir}: not a directory")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    model.eval()
    text = render_prompt(prompt, role_markers(model_dir), system)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
