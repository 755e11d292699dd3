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
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

from mftcore.errors import ConfigError

DYNAMIC_WEIGHTING_MODES = ("self-paced", "selfpaced", "coba")  # task weights from validation-loss slopes
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
    """"padding": one sample per row, padded to the batch's longest row; "pack": whole samples in rows of seq_length."""
    seq_length: int = 4096
    """Longest sample (and packed row) in tokens; longer samples follow long_sample_policy."""
    role_markers: Optional[dict] = None
    """Template before each role, keys system/user/assistant (default `<s>system\\n`, `<s>human\\n`, `<s>bot\\n`)."""
    load_raw_dataset: bool = True
    """MFTCoder compatibility: only raw JSONL is supported, so this must stay true."""
    tokenize_mode: str = "sft"
    """MFTCoder compatibility: only "sft" (loss on assistant turns) is supported."""
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
    """eager, sdpa, flash_attention_2, mftcore_varlen; null: mftcore_varlen if packing, else sdpa."""
    peft_type: Optional[str] = None
    """Null for full fine-tuning, "lora", or "qlora" (LoRA on a 4-bit NormalFloat base)."""
    trust_remote_code: bool = False
    """Allow code shipped with a model directory to run. Off unless set."""

    # --- loss ---
    weighted_loss_mode: str = "case3"
    """case1 token mean, case2 mean of sample means, case3 task-weighted mean of task token means, case4 the same of sample means."""
    task_weights: Union[None, str, list] = None
    """Per-task loss weights in data_paths order (a list or "[1,2]" string), for case3/case4; null = all 1."""

    # --- training engine: adapters, precision, dynamic weighting, evaluation, checkpoints ---
    quantization: Optional[str] = None
    """MFTCoder compatibility: "4bit" with peft_type "qlora" (which implies it), else null."""
    lora_rank: int = 96
    """LoRA rank r."""
    lora_alpha: float = 32
    """LoRA scaling numerator: adapters are scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: Union[None, str, list] = None
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

    # --- multi-process training (mftcore/distributed.py, mftcore/zero.py) ---
    distributed_type: Optional[str] = None
    """"none", "ddp", "fsdp" or "deepspeed" (MFTCoder's "FSDP"/"DeepSpeed" too); null: deepspeed if deepspeed_config is set, else ddp when WORLD_SIZE > 1, else none."""
    deepspeed_config: Union[None, str, dict] = None
    """mftcore: DeepSpeed config, a JSON file or an inline dict; batch sizes, clipping and precision are filled from this config (an explicit contradicting value is an error)."""

    # --- MFTCoder keys: accepted so its configs run unchanged (see README "MFTCoder configs") ---
    epoch_checkpointing: bool = False
    """Also save a checkpoint at the end of every epoch."""
    tokenizer_type: str = "AutoTokenizer"
    """How the tokenizer is built; only "AutoTokenizer" (as in MFTCoder)."""
    use_dynamic_padding: bool = True
    """Pad each batch to its longest sample; false (pad to seq_length) is refused: same loss, more compute."""
    data_weights: Union[None, str, list] = None
    """Sampling weights per task; MFTCoder overwrites them with 1.0, so only null or all-1 is accepted."""
    low_cpu_mem_usage: bool = True
    """Load weights without a random init first; transformers >= 5 always does, so either value is accepted."""
    use_random_sampler: bool = True
    """Legacy, never read by MFTCoder; mftcore always reshuffles the training samples each epoch."""
    init_timeout_seconds: Optional[int] = 3600
    """Timeout of the process-group set-up in multi-process runs, in seconds (null: torch's default)."""
    use_xformers: bool = True
    """Legacy, ignored: the attention backend is attn_implementation."""
    weight_by_num_documents: bool = True
    """Legacy, ignored: read only by MFTCoder's pre-tokenized binary datasets, which mftcore does not load."""
    make_vocab_size_divisible_by: int = 32
    """Legacy, ignored: MFTCoder computes a padded vocabulary size from it and never uses it."""
    model_parallel_size: int = 1
    """Legacy, ignored by MFTCoder beyond that same unused vocabulary size; only 1 is accepted."""
    use_slow_tokenizer: bool = False
    """Legacy, ignored: never read by MFTCoder; transformers >= 5 has one tokenizer backend."""
    world_size: int = 8
    """Legacy, ignored: the number of processes is torchrun's WORLD_SIZE (MFTCoder overwrites it too)."""

    def __post_init__(self):
        self.role_markers = {**DEFAULT_ROLE_MARKERS, **(self.role_markers or {})}

    # --- construction ---
    @classmethod
    def from_file(cls, path: str, overrides: list[str] | tuple = ()) -> "TrainConfig":
        """Read a JSON config, apply `key=value` overrides (value parsed as JSON, else a string), validate."""
        raw = read_json_object(path, f"{path}: config file not found")
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

    def validate_engine(self, bad, source: str) -> None:
        """Adapters, weighting, evaluation and checkpoint keys."""
        if self.peft_type not in (None, "lora", "qlora"):
            bad("peft_type", f"{self.peft_type!r} is not supported (choose from null, lora, qlora)")
        if self.quantization not in (None, "4bit"):
            bad("quantization", f"{self.quantization!r} is not supported (null, or \"4bit\" with peft_type \"qlora\")")
        if self.quantization == "4bit" and self.peft_type != "qlora":
            bad("quantization", "\"4bit\" quantization trains through adapters: set peft_type to \"qlora\"")
        if self.peft_type is not None and self.pretrained_model_path is None:
            bad("peft_type", f"{self.peft_type} adapts a pretrained model: set pretrained_model_path")
        if self.target_modules is not None and self.target_modules != "all-linear":
            self.target_modules = parse_list(self.target_modules, "target_modules", source)
        for key in ("lora_rank", "selfpaced_interval", "selfpaced_history_length", "selfpaced_sample_valid_num",
                    "coba_history_length", "coba_update_interval", "coba_sample_valid_num", "early_stopping_stall_num"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, f"must be a positive integer, got {getattr(self, key)!r}")
        for key in ("coba_warmup_steps", "max_consecutive_nonfinite"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                bad(key, f"must be an integer >= 0, got {getattr(self, key)!r}")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", f"must lie in [0, 1), got {self.lora_dropout}")
        if self.saving_limit is not None and (not isinstance(self.saving_limit, int) or self.saving_limit < 1):
            bad("saving_limit", f"must be a positive integer or null, got {self.saving_limit!r}")
        if self.weighted_loss_mode in DYNAMIC_WEIGHTING_MODES and self.task_weights is not None:
            bad("task_weights", f"weighted_loss_mode {self.weighted_loss_mode!r} computes the task weights itself")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            bad("peak_tflops", f"must be > 0 or null, got {self.peak_tflops!r}")

    def validate_distributed(self, bad) -> None:
        """distributed_type and deepspeed_config; the DeepSpeed file itself is read when training starts."""
        from mftcore.distributed import ENGINES

        if self.distributed_type is not None:
            if str(self.distributed_type).lower() not in ENGINES:
                bad("distributed_type",
                    f"{self.distributed_type!r} is not supported (choose from {', '.join(ENGINES)})")
            self.distributed_type = str(self.distributed_type).lower()
        if self.deepspeed_config is not None and not isinstance(self.deepspeed_config, (str, dict)):
            bad("deepspeed_config", f"expected a JSON file path or an object, got {self.deepspeed_config!r}")

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
            if self.weighted_loss_mode in ("case1", "case2"):
                bad("task_weights", f"weighted_loss_mode {self.weighted_loss_mode} ignores task weights "
                    "(MFTCoder applies them in case3/case4 only): remove them or choose case3/case4")
        if self.pretrained_model_path is None and self.model_config is None:
            bad("pretrained_model_path", "set pretrained_model_path or model_config")
        if self.pretrained_model_path is None and self.tokenizer_path is None:
            bad("tokenizer_path", "required when the model is built from model_config")
        if self.model_config is not None and "model_type" not in self.model_config:
            bad("model_config", "needs a model_type (e.g. \"llama\")")
        choices = {
            "padding_mode": ("padding", "pack"),
            "long_sample_policy": ("truncate", "drop"),
            "weighted_loss_mode": ("case1", "case2", "case3", "case4"),
            "lr_scheduler_type": ("cosine", "constant", "linear", "constant_with_warmup"),
            "tokenize_mode": ("sft",),
        }
        choices["weighted_loss_mode"] += DYNAMIC_WEIGHTING_MODES
        choices["mixed_precision"] = ("auto", "fp32", "bf16", "fp16")
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, f"{getattr(self, key)!r} is not supported (choose from {', '.join(allowed)})")
        self.attn_implementation = resolve_attn_implementation(self.attn_implementation, self.padding_mode, source)
        if not self.load_raw_dataset:
            bad("load_raw_dataset", "only raw JSONL data is supported (true)")
        self.validate_mftcoder_keys(bad, source)
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
        self.validate_engine(bad, source)
        self.validate_distributed(bad)
        for key in ("system", "user", "assistant"):
            if not isinstance(self.role_markers.get(key), str):
                bad("role_markers", f"{key!r} must be a string")
        unknown = set(self.role_markers) - {"system", "user", "assistant"}
        if unknown:
            bad("role_markers", f"unknown keys {sorted(unknown)} (allowed: system, user, assistant)")
        if not isinstance(self.skip_bad_samples, bool):
            bad("skip_bad_samples", f"must be true or false, got {self.skip_bad_samples!r}")
        if self.eos_token is not None and (not isinstance(self.eos_token, str) or not self.eos_token):
            bad("eos_token", f"must be a non-empty token string or null, got {self.eos_token!r}")
        if not isinstance(self.tokenize_workers, int) or self.tokenize_workers < 0:
            bad("tokenize_workers", f"must be an integer >= 0, got {self.tokenize_workers!r}")

    def validate_mftcoder_keys(self, bad, source: str) -> None:
        """The MFTCoder-compatibility block: values mftcore deliberately does not support."""
        from mftcore.model.families import check_model_type

        check_model_type(self.model_type, source)
        if str(self.tokenizer_type).lower() != "autotokenizer":
            bad("tokenizer_type", f"{self.tokenizer_type!r} is not supported; only \"AutoTokenizer\"")
        if self.use_dynamic_padding is not True:
            bad("use_dynamic_padding", "false (pad every batch to seq_length) is not supported: "
                "padding to the longest sample gives the same loss with less compute")
        if self.data_weights is not None:
            weights = parse_list(self.data_weights, "data_weights", source)
            if any(not _is_one(w) for w in weights):
                bad("data_weights", "per-task sampling weights are not supported (MFTCoder ignores them too); "
                    "use task_weights to weight the loss")
        if self.model_parallel_size != 1:
            bad("model_parallel_size", "tensor/model parallelism is not supported; only 1")
        if self.init_timeout_seconds is not None and (
                not isinstance(self.init_timeout_seconds, int) or self.init_timeout_seconds < 1):
            bad("init_timeout_seconds", f"must be a positive integer or null, got {self.init_timeout_seconds!r}")

    def split_fractions(self, source: str = "config") -> tuple[float, float, float]:
        try:
            parts = [float(p) for p in str(self.data_split).split(",")]
        except ValueError:
            parts = []
        if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
            raise ConfigError(f"{source}: data_split: expected three numbers like \"98,2,0\", got {self.data_split!r}")
        total = sum(parts)
        return parts[0] / total, parts[1] / total, parts[2] / total


def _is_one(value) -> bool:
    try:
        return float(value) == 1.0
    except (TypeError, ValueError):
        return False


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "mftcore_varlen")


def resolve_attn_implementation(value: Optional[str], padding_mode: str, source: str = "config") -> str:
    """null/"auto" -> mftcore_varlen for packed rows (documents must not see each other), else sdpa."""
    if value in (None, "auto"):
        return "mftcore_varlen" if padding_mode == "pack" else "sdpa"
    if value not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"{source}: attn_implementation: {value!r} is not supported "
                          f"(choose from {', '.join(ATTN_IMPLEMENTATIONS)}, or null for auto)")
    if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        # MFTCoder's configs ask for FA2; mftcore_varlen computes the same exact attention over the same
        # cu_seqlens, so those configs run unchanged where flash_attn cannot be installed.
        warnings.warn(f"{source}: attn_implementation: flash_attn is not installed; using mftcore_varlen instead")
        return "mftcore_varlen"
    return value


def read_json_object(path: str, missing: str) -> dict:
    """A JSON object from a file; one-line ConfigErrors: `missing` if absent, path:line if invalid."""
    if not os.path.isfile(path):
        raise ConfigError(missing)
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    return raw


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
