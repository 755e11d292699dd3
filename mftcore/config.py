"""TrainConfig: one dataclass, read from JSON, `key=value` overrides, validated once at start.

Field names are MFTCoder's (`mftcoder_accelerate/src/pefts/mft_arguments.py`) so that its configs
load unchanged; fields it does not have are marked "mftcore:" in their docstring.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from mftcore.errors import ConfigError

DEFAULT_ROLE_MARKERS = {"system": "<s>system\n", "user": "<s>human\n", "assistant": "<s>bot\n"}


@dataclass
class TrainConfig:
    # --- data ---
    data_paths: Union[str, list, None] = None
    """Task directories, one task each: a JSON list, or MFTCoder's "[a,b]" string."""
    output_dir: str = "output"
    """Where checkpoints, the final model and metrics.jsonl go."""
    tb_dir: Optional[str] = None
    """TensorBoard log directory (default: output_dir/tensorboard)."""
    data_split: str = "98,2,0"
    """train,valid,test proportions per task, read as fractions of their sum."""
    padding_mode: str = "padding"
    """"padding": one sample per row, padded to the longest row of the batch (dynamic padding)."""
    seq_length: int = 4096
    """Longest sample in tokens; longer samples are truncated (counted and reported)."""
    role_markers: Optional[dict] = None
    """Template before each role, keys system/user/assistant (default `<s>system\\n`, `<s>human\\n`, `<s>bot\\n`)."""
    load_raw_dataset: bool = True
    """MFTCoder compatibility: only raw JSONL is supported, so this must stay true."""
    tokenize_mode: str = "sft"
    """MFTCoder compatibility: only "sft" (loss on assistant turns) is supported."""
    shuffle_before_split: bool = True
    """Shuffle each task's samples (by seed) before the train/valid split."""

    # --- model ---
    pretrained_model_path: Optional[str] = None
    """Local directory of an HF model (weights as safetensors). Null: build from model_config."""
    model_config: Optional[dict] = None
    """mftcore: an HF config as a dict (with model_type) to build a randomly initialised model from."""
    tokenizer_path: Optional[str] = None
    """mftcore: tokenizer directory (default: pretrained_model_path)."""
    model_type: Optional[str] = None
    """Model family, e.g. llama, qwen2, mistral (informational unless a family needs special handling)."""
    attn_implementation: Optional[str] = None
    """eager, sdpa, flash_attention_2 (if installed), mftcore_varlen; null: mftcore_varlen if packing, else sdpa."""
    peft_type: Optional[str] = None
    """Null for full fine-tuning (LoRA/QLoRA arrive with the training-engine issue)."""
    trust_remote_code: bool = False
    """Allow code shipped with a model directory to run. Off unless set."""

    # --- loss ---
    weighted_loss_mode: str = "case3"
    """"case3": mean over tasks of each task's token-mean loss, weighted by task_weights."""
    task_weights: Union[None, str, list] = None
    """Per-task loss weights in data_paths order (a list or "[1,2]" string); null = all 1."""

    # --- optimisation ---
    num_train_epochs: int = 4
    """Passes over the training data."""
    max_train_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides num_train_epochs when set)."""
    per_device_train_batch_size: int = 8
    """Samples per micro-batch on each process."""
    per_device_eval_batch_size: int = 8
    """Samples per evaluation batch on each process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; the loss is normalised over all of them."""
    learning_rate: float = 5e-5
    """Peak learning rate (AdamW)."""
    min_lr: float = 5e-6
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.01
    """AdamW weight decay, not applied to biases and norm weights."""
    adam_beta1: float = 0.9
    """mftcore: AdamW beta1."""
    adam_beta2: float = 0.95
    """mftcore: AdamW beta2."""
    max_grad_norm: float = 1.0
    """mftcore: clip the global gradient norm to this (0 disables)."""
    lr_scheduler_type: str = "cosine"
    """"cosine" (to min_lr) or "constant", both after linear warmup."""
    num_warmup_steps: Union[int, float] = 0.05
    """Warmup length in optimizer steps (int) or as a fraction of all steps (float < 1)."""
    seed: int = 1234
    """Seed for model init, shuffling and dropout."""

    # --- logging and saving ---
    log_interval: int = 10
    """Log every this many optimizer steps (metrics.jsonl, TensorBoard, progress bar)."""
    evaluation_steps: int = 100
    """Compute the per-task validation loss every this many optimizer steps (0 disables)."""
    checkpointing_steps: int = 100
    """Save a checkpoint every this many optimizer steps (and always at the end)."""

    def __post_init__(self):
        self.role_markers = {**DEFAULT_ROLE_MARKERS, **(self.role_markers or {})}

    # --- construction ---
    @classmethod
    def from_file(cls, path: str, overrides: list[str] | tuple = ()) -> "TrainConfig":
        """Read a JSON config, apply `key=value` overrides (value parsed as JSON, else a string), validate."""
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a JSON object")
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r}: expected key=value")
            raw[key.strip()] = parse_value(value)
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "TrainConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
        cfg = cls(**raw)
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --- validation ---
    def validate(self, source: str = "config") -> None:
        def bad(key, msg):
            raise ConfigError(f"{source}: {key}: {msg}")

        if not self.data_paths:
            bad("data_paths", "required: a list of task directories")
        self.data_paths = parse_list(self.data_paths, "data_paths", source)
        if self.task_weights is not None:
            weights = parse_list(self.task_weights, "task_weights", source)
            try:
                self.task_weights = [float(w) for w in weights]
            except ValueError:
                bad("task_weights", f"expected numbers, got {weights}")
            if len(self.task_weights) != len(self.data_paths):
                bad("task_weights", f"{len(self.task_weights)} weights for {len(self.data_paths)} data_paths")
            if any(w < 0 for w in self.task_weights) or sum(self.task_weights) <= 0:
                bad("task_weights", "weights must be >= 0 and not all 0")
        if self.pretrained_model_path is None and self.model_config is None:
            bad("pretrained_model_path", "set pretrained_model_path or model_config")
        if self.pretrained_model_path is None and self.tokenizer_path is None:
            bad("tokenizer_path", "required when the model is built from model_config")
        if self.model_config is not None and "model_type" not in self.model_config:
            bad("model_config", "needs a model_type (e.g. \"llama\")")
        choices = {
            "padding_mode": ("padding",),
            "weighted_loss_mode": ("case3",),
            "lr_scheduler_type": ("cosine", "constant"),
            "tokenize_mode": ("sft",),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, f"{getattr(self, key)!r} is not supported (choose from {', '.join(allowed)})")
        self.attn_implementation = resolve_attn_implementation(self.attn_implementation, self.padding_mode, source)
        if self.peft_type is not None:
            bad("peft_type", f"{self.peft_type!r} is not supported yet; only null (full fine-tuning)")
        if not self.load_raw_dataset:
            bad("load_raw_dataset", "only raw JSONL data is supported (true)")
        for key in ("seq_length", "num_train_epochs", "per_device_train_batch_size",
                    "per_device_eval_batch_size", "gradient_accumulation_steps", "log_interval"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, f"must be a positive integer, got {getattr(self, key)!r}")
        for key in ("evaluation_steps", "checkpointing_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                bad(key, f"must be an integer >= 0, got {getattr(self, key)!r}")
        if self.max_train_steps is not None and (not isinstance(self.max_train_steps, int) or self.max_train_steps < 1):
            bad("max_train_steps", f"must be a positive integer or null, got {self.max_train_steps!r}")
        if not (0 <= self.min_lr <= self.learning_rate):
            bad("min_lr", f"must lie in [0, learning_rate={self.learning_rate}], got {self.min_lr}")
        if self.num_warmup_steps < 0 or (isinstance(self.num_warmup_steps, float) and self.num_warmup_steps >= 1):
            bad("num_warmup_steps", "an int >= 0 (steps) or a float in [0, 1) (fraction of all steps)")
        self.split_fractions(source)
        for key in ("system", "user", "assistant"):
            if not isinstance(self.role_markers.get(key), str):
                bad("role_markers", f"{key!r} must be a string")
        unknown = set(self.role_markers) - {"system", "user", "assistant"}
        if unknown:
            bad("role_markers", f"unknown keys {sorted(unknown)} (allowed: system, user, assistant)")

    def split_fractions(self, source: str = "config") -> tuple[float, float, float]:
        try:
            parts = [float(p) for p in str(self.data_split).split(",")]
        except ValueError:
            parts = []
        if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
            raise ConfigError(f"{source}: data_split: expected three numbers like \"98,2,0\", got {self.data_split!r}")
        total = sum(parts)
        return parts[0] / total, parts[1] / total, parts[2] / total


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "mftcore_varlen")


def resolve_attn_implementation(value: Optional[str], padding_mode: str, source: str = "config") -> str:
    """null/"auto" -> mftcore_varlen for packed rows (documents must not see each other), else sdpa."""
    if value in (None, "auto"):
        return "mftcore_varlen" if padding_mode == "pack" else "sdpa"
    if value not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"{source}: attn_implementation: {value!r} is not supported "
                          f"(choose from {', '.join(ATTN_IMPLEMENTATIONS)}, or null for auto)")
    if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(f"{source}: attn_implementation: flash_attention_2 needs the flash_attn package, "
                          "which is not installed; mftcore_varlen is the packed-attention kernel that ships here")
    return value


def parse_value(text: str) -> Any:
    """A command-line override value: JSON when it parses (numbers, true, null, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_list(value: Union[str, list], key: str, source: str) -> list:
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
