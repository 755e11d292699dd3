"""TrainConfig: one dataclass, read from JSON, `key=value` overrides, validated once at start.

Field names are MFTCoder's (`mftcoder_accelerate/src/pefts/mft_arguments.py`) so that its configs
load unchanged (mftcore/mftcoder.py reads its legacy keys and spellings first); fields it does not
have are marked "mftcore:" in their docstring. Validation is declarative: every field's type comes from
its annotation (bools are not ints), then the tables below give ranges and choices, and RULES the few
checks across fields. Values that depend on the machine (the attention backend, the engine, the
precision) are resolved by their owners when training starts, never here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union

from mftcore import mftcoder
from mftcore.data.render import DEFAULT_ROLE_MARKERS
from mftcore.data.sources import task_spec
from mftcore.errors import ConfigError
from mftcore.io import JsonProblem, parse_json, read_json_object, read_regular_bytes
from mftcore.loss import LOSS_MODES, MODE_ALIASES, loss_mode
from mftcore.trackers import report_to_problem
from mftcore.yamlconfig import YAML_SUFFIXES, parse_yaml


@dataclass
class TrainConfig:
    # --- data ---
    data_paths: Optional[list[Union[str, dict]]] = None
    """Tasks, one per entry (a JSON list, or MFTCoder's "[a,b]" string): a directory or file of .jsonl/.json/.parquet/.arrow/.csv, a save_to_disk directory, a Hub dataset name, or {"path", "split", "subset", "columns"}."""
    output_dir: str = "output"
    """Where checkpoints, the final model and metrics.jsonl go."""
    tb_dir: Optional[str] = None
    """TensorBoard log directory (default: output_dir/tensorboard)."""
    data_split: str = "98,2,0"
    """train,valid,test proportions per task, read as fractions of their sum."""
    padding_mode: str = "padding"
    """"padding": one sample per row, padded to the batch's longest row; "pack": whole samples in rows of seq_length."""
    seq_length: int = 4096
    """Longest sample (and packed row) in tokens; longer samples follow long_sample_policy."""
    role_markers: Optional[dict] = None
    """Template before each role, keys system/user/assistant (default `<s>system\\n`, `<s>human\\n`, `<s>bot\\n`)."""
    shuffle_before_split: bool = True
    """Shuffle each task's samples (by seed) before the train/valid split."""
    long_sample_policy: str = "truncate"
    """mftcore: a sample longer than seq_length is "truncate"d to it or "drop"ped; counted per task either way."""
    skip_bad_samples: bool = False
    """mftcore: skip bad lines (counted per task) instead of stopping at the first one with file:line."""
    eos_token: Optional[str] = None
    """mftcore: token appended to each answer and used as padding (default: the tokenizer's eos_token)."""
    cache_dir: Optional[str] = None
    """mftcore: where `prepare` keeps the tokenized data (default: mftcore_cache next to output_dir)."""
    tokenize_workers: int = 0
    """mftcore: processes that tokenize the data (0: one per CPU, at most 8)."""
    chat_template: Optional[str] = None
    """mftcore: null or "mftcoder": MFTCoder's training string (role_markers); "model": the tokenizer's own chat template, trained on assistant turns and their end-of-turn tokens."""
    data_weights: Optional[list[float]] = None
    """Per-task sampling proportions in data_paths order (a list or "[1,2]" string): task t is drawn with p_t = w_t / sum(w), times n_t^(1/T) with sampling_temperature; null = every sample once per epoch."""
    sampling_temperature: Optional[float] = None
    """mftcore: draw task t with p_t proportional to n_t^(1/T) (n_t: its training samples; 1 = natural, larger = flatter); an epoch is as many draws as training samples."""
    fim_rate: Union[float, list[float]] = 0.0
    """mftcore: fraction of plain-code (`text`) samples turned into fill-in-the-middle, one number or a list per task."""
    fim_spm_rate: Union[float, list[float]] = 0.0
    """mftcore: fraction of the FIM samples in SPM order (suffix first) instead of PSM, one number or a list per task."""
    fim_tokens: Optional[list[str]] = None
    """mftcore: the tokenizer's FIM tokens [prefix, suffix, middle] (null: the model family's, or known spellings in the vocabulary)."""

    # --- model ---
    pretrained_model_path: Optional[str] = None
    """Local directory of an HF model (weights as safetensors). Null: build from model_config."""
    model_config: Optional[dict] = None
    """mftcore: an HF config as a dict (with model_type) to build a randomly initialised model from."""
    tokenizer_path: Optional[str] = None
    """mftcore: tokenizer directory (default: pretrained_model_path)."""
    model_type: Optional[str] = None
    """Model family in MFTCoder's names (llama, deepseek, starcoder, ...); checked against the checkpoint."""
    attn_implementation: Optional[str] = None
    """eager, sdpa, flash_attention_2, mftcore_varlen; null: mftcore_varlen if packing, else sdpa (eager where
    transformers has no sdpa for the model: Gemma2)."""
    peft_type: Optional[str] = None
    """Null for full fine-tuning, "lora", or "qlora" (LoRA on a 4-bit NormalFloat base)."""
    trust_remote_code: bool = False
    """Allow code shipped with a model directory to run. Off unless set."""

    # --- loss ---
    weighted_loss_mode: str = "case3"
    """case1 token mean, case2 mean of sample means, case3 task-weighted mean of task token means, case4 the same of sample means."""
    task_weights: Optional[list[float]] = None
    """Per-task loss weights in data_paths order (a list or "[1,2]" string), for case3/case4; null = all 1."""

    # --- training engine: adapters, precision, dynamic weighting, evaluation, checkpoints ---
    lora_rank: int = 96
    """LoRA rank r."""
    lora_alpha: float = 32
    """LoRA scaling numerator: adapters are scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: Union[None, str, list[str]] = None
    """Module names that get LoRA adapters (a list or "[a,b]"); null or "all-linear": every linear but the LM head."""
    gradient_checkpointing: bool = True
    """mftcore: recompute decoder layers in the backward pass (less memory, ~1/3 more compute)."""
    mixed_precision: str = "auto"
    """mftcore: matmul dtype "fp32", "bf16" or "fp16" (autocast; fp32 master weights); "auto" = bf16 on a GPU that has it, else fp32. Also QLoRA's compute dtype."""
    router_aux_loss_coef: Optional[float] = None
    """MoE (mixtral, qwen2_moe): weight of the router load-balancing loss; null = the model config's value, 0 = off."""
    selfpaced_interval: int = 1
    """self-paced: measure the validation losses every this many optimizer steps."""
    selfpaced_history_length: int = 100
    """self-paced: measurements the slopes are fitted over; weights are uniform until that many exist."""
    selfpaced_sample_valid_num: int = 1
    """self-paced: validation batches per measurement."""
    selfpaced_scale_factor: float = 50
    """self-paced: inverse temperature of the final softmax."""
    coba_warmup_steps: int = 100
    """CoBa: uniform weights before this optimizer step."""
    coba_history_length: int = 200
    """CoBa: measurements the slopes are fitted over (N in the paper)."""
    coba_tau: float = 5
    """CoBa: temperature of the divergence factor."""
    coba_update_interval: int = 1
    """CoBa: measure the validation losses (and update the weights) every this many optimizer steps."""
    coba_sample_valid_num: int = 1
    """CoBa: validation batches per measurement."""
    early_stopping: bool = True
    """Stop when the validation loss has not improved for early_stopping_stall_num evaluations."""
    early_stopping_stall_num: int = 5
    """Evaluations without a new best validation loss before early stopping."""
    saving_limit: Optional[int] = None
    """Keep at most this many step checkpoints (null: all); the best and the latest are always kept."""
    resume_from_checkpoint: Optional[str] = None
    """A checkpoint directory to continue from, or "auto" for the newest in output_dir (fresh if none)."""
    auto_resume: bool = True
    """With resume_from_checkpoint null: continue from output_dir's newest checkpoint if any (false: a fresh run, which refuses an output_dir holding checkpoints)."""
    max_consecutive_nonfinite: int = 5
    """mftcore: steps with a non-finite loss or gradient are skipped; more than this many in a row stop the run."""
    peak_tflops: Optional[float] = None
    """mftcore: the accelerator's peak TFLOP/s for the MFU estimate (null: looked up for known GPUs in bf16/fp16)."""
    torch_compile: bool = False
    """mftcore: torch.compile each decoder layer and the loss (the kernels are custom ops: no graph breaks); the first steps compile."""

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
    eval_at_start: bool = False
    """mftcore: also compute the validation loss before the first step, logged as step 0 (HF's eval_on_start); the training's random streams are untouched."""
    checkpointing_steps: int = 100
    """Save a checkpoint every this many optimizer steps (and always at the end)."""
    report_to: Union[str, list[str]] = "tensorboard"
    """mftcore (HF Trainer's key): where the scalars go besides metrics.jsonl: "tensorboard", "wandb", "mlflow", "trackio", "none", or a list of them (each tracker but TensorBoard is a pip extra: mftcore[wandb])."""

    # --- multi-process training (mftcore/parallel/) ---
    distributed_type: Optional[str] = None
    """"none", "ddp", "fsdp" or "deepspeed" (MFTCoder's "FSDP"/"DeepSpeed" too); null: deepspeed if deepspeed_config is set, else ddp when WORLD_SIZE > 1, else none."""
    deepspeed_config: Union[None, str, dict] = None
    """mftcore: DeepSpeed config, a JSON file or an inline dict; batch sizes, clipping and precision are filled from this config (an explicit contradicting value is an error)."""

    # --- MFTCoder's keys of no other section (its legacy keys are read and dropped by mftcore/mftcoder.py) ---
    epoch_checkpointing: bool = False
    """Also save a checkpoint at the end of every epoch."""
    init_timeout_seconds: Optional[int] = 3600
    """Timeout of the process-group set-up in multi-process runs, in seconds (null: torch's default)."""

    # --- code evaluation during training (mftcore/codeeval/; entries checked when training starts) ---
    eval_benchmarks: Optional[list] = None
    """mftcore: code benchmarks to run during training, [{name, file, k, n, max_new_tokens, every_steps, ...}] (every field: mftcore/codeeval/spec.py); pass@k per benchmark and task tag is logged."""
    metric_for_best: Optional[str] = None
    """mftcore: what picks the best checkpoint and drives early stopping: null or "loss" (validation loss, lower is better), or "NAME/pass@K" of an eval_benchmarks entry (higher is better)."""
    num_threads: Optional[int] = None
    """mftcore: CPU threads of torch's intra-op pool in each process (torch.set_num_threads); null: torch's default. Reported at start-up."""

    def __post_init__(self):
        if self.role_markers is None or isinstance(self.role_markers, dict):
            self.role_markers = {**DEFAULT_ROLE_MARKERS, **(self.role_markers or {})}

    # --- construction ---
    @classmethod
    def from_file(cls, path: str, overrides: list[str] | tuple = ()) -> "TrainConfig":
        """Read a JSON or YAML config, apply `key=value` overrides (value parsed as JSON, else a string), validate."""
        raw = read_config(path)
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r}: expected key=value")
            raw[key.strip()] = parse_value(value, key.strip())
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "TrainConfig":
        raw = mftcoder.normalise(raw, source)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
        check_types(raw, source)
        check_finite(raw, source)
        cfg = cls(**raw)
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, source: str = "config") -> None:
        for key, check in (*((k, positive_int) for k in POSITIVE_INTS),
                           *((k, non_negative_int) for k in NON_NEGATIVE_INTS),
                           *((k, positive_int_or_null) for k in POSITIVE_INTS_OR_NULL),
                           *((k, non_negative_number) for k in NON_NEGATIVE_NUMBERS),
                           *RANGES.items()):
            problem = check(getattr(self, key))
            if problem:
                raise ConfigError(f"{source}: {key}: {problem}")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                shown = ", ".join("null" if a is None else str(a) for a in allowed)
                raise ConfigError(f"{source}: {key}: {getattr(self, key)!r} is not supported (choose from {shown})")
        if self.task_weights is not None:
            try:
                self.task_weights = [float(w) for w in self.task_weights]
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: task_weights: expected numbers, got {self.task_weights}") from None
        check_data_options(self, source)
        self.split_fractions(source)
        for key, broken, message in RULES:
            if broken(self):
                raise ConfigError(f"{source}: {key}: {message(self)}")

    def split_fractions(self, source: str = "config") -> tuple[float, float, float]:
        """data_split as fractions of its sum: (train, valid, test)."""
        try:
            parts = [float(p) for p in str(self.data_split).split(",")]
        except ValueError:
            parts = []
        if len(parts) != 3 or any(not (p >= 0) or math.isinf(p) for p in parts) or not sum(parts) > 0:
            raise ConfigError(f"{source}: data_split: expected three numbers like \"98,2,0\", got {self.data_split!r}")
        total = sum(parts)
        return parts[0] / total, parts[1] / total, parts[2] / total


# --- the validation tables -------------------------------------------------------------------------

POSITIVE_INTS = ("seq_length", "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "log_interval", "lora_rank", "selfpaced_interval",
                 "selfpaced_history_length", "selfpaced_sample_valid_num", "coba_history_length",
                 "coba_update_interval", "coba_sample_valid_num", "early_stopping_stall_num")
NON_NEGATIVE_INTS = ("evaluation_steps", "checkpointing_steps", "coba_warmup_steps", "max_consecutive_nonfinite",
                     "tokenize_workers", "seed")
POSITIVE_INTS_OR_NULL = ("max_train_steps", "saving_limit", "init_timeout_seconds", "num_threads")
NON_NEGATIVE_NUMBERS = ("learning_rate", "min_lr", "weight_decay", "max_grad_norm", "lora_alpha")


def positive_int(v) -> Optional[str]:
    return None if isinstance(v, int) and v >= 1 else f"must be a positive integer, got {v!r}"


def non_negative_int(v) -> Optional[str]:
    return None if isinstance(v, int) and v >= 0 else f"must be an integer >= 0, got {v!r}"


def positive_int_or_null(v) -> Optional[str]:
    return None if v is None or (isinstance(v, int) and v >= 1) else f"must be a positive integer or null, got {v!r}"


def non_negative_number(v) -> Optional[str]:
    return None if v >= 0 and math.isfinite(v) else f"must be a finite number >= 0, got {v!r}"


MAX_INT = 1 << 62  # any integer key: beyond this torch's int64 arithmetic (steps x batch, seeds) overflows
# The C++ packer holds ~32 bytes per unit of seq_length (a heap and a counting-sort bucket per room value):
# 512 MiB here; 2**63-1 used to crash it. 16M tokens is beyond any model's context today.
MAX_SEQ_LENGTH = 1 << 24

RANGES = {
    "lora_dropout": lambda v: None if 0 <= v < 1 else f"must lie in [0, 1), got {v}",
    "adam_beta1": lambda v: None if 0 <= v < 1 else f"must lie in [0, 1), got {v}",
    "adam_beta2": lambda v: None if 0 <= v < 1 else f"must lie in [0, 1), got {v}",
    "peak_tflops": lambda v: None if v is None or (v > 0 and math.isfinite(v)) else f"must be > 0 or null, got {v!r}",
    "router_aux_loss_coef": lambda v: None if v is None or (v >= 0 and math.isfinite(v)) else
    f"must be >= 0 or null, got {v!r}",
    "num_warmup_steps": lambda v: None if (isinstance(v, int) and v >= 0) or (isinstance(v, float) and 0 <= v < 1)
    else "an int >= 0 (steps) or a float in [0, 1) (fraction of all steps)",
    "seq_length": lambda v: None if v <= MAX_SEQ_LENGTH else f"must be at most {MAX_SEQ_LENGTH}, got {v}",
    "coba_tau": lambda v: None if v > 0 else f"must be > 0 (a temperature), got {v}",
    "selfpaced_scale_factor": lambda v: None if v >= 0 else f"must be >= 0 (an inverse temperature), got {v}",
    "tokenize_workers": lambda v: None if v <= 1024 else f"must be at most 1024, got {v}",
    "init_timeout_seconds": lambda v: None if v is None or v <= 10**9 else f"must be at most 1e9 seconds, got {v}",
    "sampling_temperature": lambda v: None if v is None or v > 0 else f"must be > 0 or null, got {v}",
    "fim_rate": lambda v: None if all(0 <= r <= 1 for r in (v if isinstance(v, list) else [v]))
    else f"rates must be numbers in [0, 1], got {v!r}",
    "fim_spm_rate": lambda v: None if all(0 <= r <= 1 for r in (v if isinstance(v, list) else [v]))
    else f"rates must be numbers in [0, 1], got {v!r}",
}

CHOICES = {
    "padding_mode": ("padding", "pack"),
    "long_sample_policy": ("truncate", "drop"),
    "weighted_loss_mode": (*LOSS_MODES, *MODE_ALIASES),
    "lr_scheduler_type": ("cosine", "constant", "linear", "constant_with_warmup"),
    "mixed_precision": ("auto", "fp32", "bf16", "fp16"),
    "peft_type": (None, "lora", "qlora"),
    # null / "auto": resolved when the model is built (mftcore/model/load.py)
    "attn_implementation": (None, "auto", "eager", "sdpa", "flash_attention_2", "mftcore_varlen"),
    "chat_template": (None, "mftcoder", "model"),
}

ROLE_KEYS = ("system", "user", "assistant")

# (key, broken(cfg), message(cfg)): the checks across fields, in the order they are reported.
RULES = [
    ("data_paths", lambda c: not c.data_paths, lambda c: "required: a list of task directories"),
    ("report_to", lambda c: report_to_problem(c.report_to), lambda c: report_to_problem(c.report_to)),
    ("task_weights", lambda c: c.task_weights is not None and len(c.task_weights) != len(c.data_paths),
     lambda c: f"{len(c.task_weights)} weights for {len(c.data_paths)} data_paths"),
    ("task_weights", lambda c: c.task_weights is not None and (
        any(not (w >= 0) or math.isinf(w) for w in c.task_weights) or sum(c.task_weights) <= 0),
     lambda c: "weights must be finite, >= 0 and not all 0"),
    ("task_weights", lambda c: c.task_weights is not None and loss_mode(c.weighted_loss_mode).dynamic,
     lambda c: f"weighted_loss_mode {c.weighted_loss_mode!r} computes the task weights itself"),
    ("task_weights", lambda c: c.task_weights is not None and not loss_mode(c.weighted_loss_mode).weighted,
     lambda c: f"weighted_loss_mode {c.weighted_loss_mode} ignores task weights (MFTCoder applies them in "
               "case3/case4 only): remove them or choose case3/case4"),
    ("pretrained_model_path", lambda c: c.pretrained_model_path is None and c.model_config is None,
     lambda c: "set pretrained_model_path or model_config"),
    ("tokenizer_path", lambda c: c.pretrained_model_path is None and c.tokenizer_path is None,
     lambda c: "required when the model is built from model_config"),
    ("model_config", lambda c: c.model_config is not None and "model_type" not in c.model_config,
     lambda c: "needs a model_type (e.g. \"llama\")"),
    ("min_lr", lambda c: not c.min_lr <= c.learning_rate,
     lambda c: f"must lie in [0, learning_rate={c.learning_rate}], got {c.min_lr}"),
    ("peft_type", lambda c: c.peft_type is not None and c.pretrained_model_path is None,
     lambda c: f"{c.peft_type} adapts a pretrained model: set pretrained_model_path"),
    ("role_markers", lambda c: set(c.role_markers) - set(ROLE_KEYS),
     lambda c: f"unknown keys {sorted(set(c.role_markers) - set(ROLE_KEYS))} (allowed: system, user, assistant)"),
    ("role_markers", lambda c: any(not isinstance(c.role_markers[k], str) for k in ROLE_KEYS),
     lambda c: f"{next(k for k in ROLE_KEYS if not isinstance(c.role_markers[k], str))!r} must be a string"),
    ("eos_token", lambda c: c.eos_token == "", lambda c: "must be a non-empty token string or null, got ''"),
    ("output_dir", lambda c: not c.output_dir.strip(), lambda c: "must name a directory, got an empty string"),
    ("data_split", lambda c: c.split_fractions()[0] == 0,
     lambda c: f"{c.data_split!r} leaves no training samples (its first share is 0)"),
    ("seq_length", lambda c: c.per_device_train_batch_size * c.seq_length >= 1 << 31,
     lambda c: f"per_device_train_batch_size x seq_length = {c.per_device_train_batch_size * c.seq_length} tokens "
               "per micro-batch; the document boundaries are int32: keep it below 2**31"),
    ("model_config", lambda c: c.model_config is not None and not isinstance(c.model_config.get("model_type"), str),
     lambda c: f"model_type must be a string such as \"llama\", got {c.model_config.get('model_type')!r}"),
    ("target_modules", lambda c: c.target_modules == [] or c.target_modules == "",
     lambda c: "must name at least one module, or be null / \"all-linear\""),
    ("eval_benchmarks", lambda c: not all(isinstance(e, dict) for e in c.eval_benchmarks or []),
     lambda c: "expected a list of objects {name, file, k, n, max_new_tokens, every_steps, ...}"),
    ("metric_for_best", lambda c: c.metric_for_best not in (None, "loss") and not c.eval_benchmarks,
     lambda c: f"{c.metric_for_best!r} names a benchmark metric, but eval_benchmarks is empty"),
]


def check_data_options(cfg: TrainConfig, source: str) -> None:
    """data_paths entries, data_weights, sampling_temperature and the FIM keys (issue 17)."""
    n = len(cfg.data_paths or [])
    for entry in cfg.data_paths or []:
        task_spec(entry, f"{source}: data_paths")
    if cfg.data_weights is not None:
        try:
            cfg.data_weights = [float(w) for w in cfg.data_weights]
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: data_weights: expected numbers, got {cfg.data_weights}") from None
        if len(cfg.data_weights) != n:
            raise ConfigError(f"{source}: data_weights: {len(cfg.data_weights)} weights for {n} data_paths")
        if any(not (w >= 0) or math.isinf(w) for w in cfg.data_weights) or sum(cfg.data_weights) <= 0:
            raise ConfigError(f"{source}: data_weights: weights must be finite, >= 0 and not all 0")
    t = cfg.sampling_temperature
    if t is not None and not (t > 0 and math.isfinite(t)):
        raise ConfigError(f"{source}: sampling_temperature: must be a finite number > 0 or null, got {t!r}")
    for key in ("fim_rate", "fim_spm_rate"):
        value = getattr(cfg, key)
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) != n:
            raise ConfigError(f"{source}: {key}: {len(value)} rates for {n} data_paths")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in values):
            raise ConfigError(f"{source}: {key}: rates must be numbers in [0, 1], got {value!r}")
    if cfg.fim_tokens is not None and (len(cfg.fim_tokens) != 3 or not all(cfg.fim_tokens)):
        raise ConfigError(f"{source}: fim_tokens: expected [prefix, suffix, middle] token strings, "
                          f"got {cfg.fim_tokens}")


# --- types from the annotations --------------------------------------------------------------------

def matches(value, hint) -> bool:
    """Whether a JSON value fits a field annotation (Optional/Union/list/dict/str/int/float/bool)."""
    origin = typing.get_origin(hint)
    if origin is Union:
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 1e-3 and 1 alike: an int is a float here, a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is Any:
        return True
    if origin is list and typing.get_args(hint):
        return isinstance(value, list) and all(matches(v, typing.get_args(hint)[0]) for v in value)
    return isinstance(value, origin or hint)


def describe(hint) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    if typing.get_origin(hint) is Union:
        args = typing.get_args(hint)
        kinds = [describe(a) for a in args if a is not type(None)] + (["null"] if type(None) in args else [])
        return ", ".join(kinds[:-1]) + " or " + kinds[-1]
    if typing.get_origin(hint) is list and typing.get_args(hint):
        return f"a list of {describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return names.get(typing.get_origin(hint) or hint, str(hint))


def check_types(raw: dict, source: str) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for key, value in raw.items():
        if not matches(value, hints[key]):
            raise ConfigError(f"{source}: {key}: expected {describe(hints[key])}, got {json.dumps(value)[:80]}")


def check_finite(raw: dict, source: str) -> None:
    """No NaN or infinity anywhere in a config (json reads NaN and Infinity), and no integer beyond MAX_INT."""
    for key, value in raw.items():
        stack = [("", value)]
        while stack:
            where, v = stack.pop()
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{source}: {key}{where}: must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
                raise ConfigError(f"{source}: {key}{where}: {str(v)[:30]}... is out of range (at most 2**62)")
            if isinstance(v, dict):
                stack.extend((f"{where}.{k}", x) for k, x in v.items())
            elif isinstance(v, list):
                stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))


def read_config(path: str) -> dict:
    """The raw key -> value dict of a config file: the one place config files are read and parsed.
    JSON, or YAML for a .yaml / .yml file (mftcore/yamlconfig.py: the same strictness and errors)."""
    if not path.lower().endswith(YAML_SUFFIXES):
        return read_json_object(path, f"{path}: config file not found")
    data = read_regular_bytes(path, ConfigError, f"{path}: config file not found", "config file")
    try:
        raw = parse_yaml(data)
    except JsonProblem as p:
        raise ConfigError(p.where(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a YAML mapping (key: value lines), "
                          f"got {'nothing (an empty document)' if raw is None else type(raw).__name__}")
    return raw


def parse_value(text: str, key: str = "value") -> Any:
    """A command-line override value: JSON when it parses (numbers, true, null, lists), else the raw string.
    Text that is JSON but breaks the strict reader's rules (duplicate keys, nesting) is an error."""
    try:
        return parse_json(text)
    except JsonProblem as p:
        if p.reason.startswith("invalid JSON"):
            return text
        raise ConfigError(f"override {key}: {p.reason}") from None
