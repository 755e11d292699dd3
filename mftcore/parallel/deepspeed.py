"""DeepSpeed ZeRO stage 2 and 3 (`distributed_type: "deepspeed"`), configured from ours.

`deepspeed_config` is a DeepSpeed JSON file or an inline dict. mftcore fills the keys that describe
its own run, so the two configs never disagree; such a key may be absent or "auto", and any other
value that differs from ours is a one-line ConfigError naming it:

  train_micro_batch_size_per_gpu   per_device_train_batch_size
  gradient_accumulation_steps      gradient_accumulation_steps
  train_batch_size                 per_device_train_batch_size x gradient_accumulation_steps x WORLD_SIZE
  gradient_clipping                max_grad_norm (0: off)
  bf16.enabled / fp16.enabled      mixed_precision (resolved: "auto" is bf16 on a GPU that has it)
  zero_optimization.reduce_bucket_size, stage3_prefetch_bucket_size, stage3_param_persistence_threshold
                                   "auto" only: hidden_size^2, 0.9 hidden_size^2, 10 hidden_size (as HF does)

The optimizer and the schedule are ours, passed to DeepSpeed as client objects: AdamW with
learning_rate, adam_beta1/2 and weight_decay (none on biases and norms), or DeepSpeedCPUAdam with the
same groups when `zero_optimization.offload_optimizer.device` is "cpu" or "nvme"; warmup + cosine
stepped by the loop. An "optimizer" or "scheduler" section is therefore refused. Without
`deepspeed_config`, ZeRO stage 2 runs with DeepSpeed's defaults. QLoRA runs under stage 2 only.

Steps: each micro-batch's backward runs with the accumulation boundary set by us (the last
micro-batch of a step is the boundary; an epoch's last step may have fewer micro-batches than
gradient_accumulation_steps), the loss times the world size (DeepSpeed averages over ranks) and
scale_wrt_gas=False (our token scales already normalise over the step); engine.step() clips, skips
a step whose gradient norm is not finite, and applies AdamW.

Checkpoints are DeepSpeed's own (`engine.save_checkpoint`, tag "deepspeed" inside checkpoint-N/);
DeepSpeed reads them back with torch.load(weights_only=False), so resume or export only checkpoints
you trust. Export gathers the weights with DeepSpeed's zero_to_fp32.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings

import torch

from mftcore.errors import ConfigError
from mftcore.io import read_json_object
from mftcore.parallel.engine import Engine

TAG = "deepspeed"  # the subdirectory of checkpoint-N/ that DeepSpeed writes


def read_deepspeed_config(value) -> tuple:
    """(dict, name for messages) from an inline dict or a JSON file."""
    if isinstance(value, dict):
        return copy.deepcopy(value), "deepspeed_config"
    return read_json_object(value, f"deepspeed_config: {value}: file not found"), value


def fill_value(ds: dict, key: str, ours, our_key: str, source: str) -> None:
    theirs = ds.get(key, "auto")
    if theirs != "auto" and theirs != ours:
        raise ConfigError(f"{source}: {key}: {theirs!r} contradicts {our_key} = {ours!r} (remove it or set \"auto\")")
    ds[key] = ours


def fill_deepspeed_config(cfg, world_size: int, dtype: torch.dtype, hidden_size: int) -> dict:
    """The DeepSpeed config of this run: the user's, with our keys filled and checked (module docstring)."""
    ds, source = read_deepspeed_config(cfg.deepspeed_config) if cfg.deepspeed_config is not None else ({}, "deepspeed")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{source}: {section}: mftcore passes its own AdamW and learning-rate schedule "
                              "(learning_rate, min_lr, lr_scheduler_type, num_warmup_steps, weight_decay, "
                              "adam_beta1/2): remove this section")
    micro, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    fill_value(ds, "train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size", source)
    fill_value(ds, "gradient_accumulation_steps", accumulation, "gradient_accumulation_steps", source)
    fill_value(ds, "train_batch_size", micro * accumulation * world_size,
               "per_device_train_batch_size x gradient_accumulation_steps x WORLD_SIZE", source)
    fill_value(ds, "gradient_clipping", float(cfg.max_grad_norm), "max_grad_norm", source)
    for name, want in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = ds.get(name) or {}
        enabled = section.get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != want:
            raise ConfigError(f"{source}: {name}.enabled: {enabled!r} contradicts mixed_precision="
                              f"{cfg.mixed_precision!r} ({str(dtype).removeprefix('torch.')} on this machine)")
        section["enabled"] = want
        if name == "bf16" and want:
            section.setdefault("check_grad_overflow", True)  # skip a step with a non-finite gradient
        ds[name] = section
    zero = ds.setdefault("zero_optimization", {"stage": 2})
    if zero.get("stage") not in (2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage: {zero.get('stage')!r} is not supported "
                          "(2 or 3; for a replica per rank use distributed_type ddp)")
    if cfg.peft_type == "qlora" and zero["stage"] == 3:
        raise ConfigError(f"{source}: zero_optimization.stage: QLoRA's 4-bit weights run under ZeRO stage 2 only")
    autos = {"reduce_bucket_size": hidden_size * hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "stage3_param_persistence_threshold": 10 * hidden_size}
    for key, value in list(zero.items()):
        if value == "auto":
            if key not in autos:
                raise ConfigError(f"{source}: zero_optimization.{key}: \"auto\" is filled only for "
                                  f"{', '.join(autos)}; give a value")
            zero[key] = autos[key]
    ds.setdefault("steps_per_print", 1 << 30)  # our progress bar and metrics report; DeepSpeed's would interleave
    return ds


def offloads_optimizer(ds: dict) -> bool:
    device = (ds["zero_optimization"].get("offload_optimizer") or {}).get("device", "none")
    return device in ("cpu", "nvme")


def cpu_adam_like(optimizer, cfg):
    """DeepSpeedCPUAdam over the same parameter groups as our AdamW (ZeRO-Offload steps on the CPU)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return DeepSpeedCPUAdam(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay, adamw_mode=True)


def import_deepspeed(device: torch.device):
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed is first imported
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("distributed_type: deepspeed needs DeepSpeed (pip install deepspeed, or "
                          "mftcore[deepspeed])") from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would interleave with ours
    # DeepSpeed 0.19.8 calls these in every step; torch 2.13 warns each time.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                            "deprecated", FutureWarning)
    return deepspeed


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine behind the Engine interface; `module` is the DeepSpeed engine itself."""

    name = "deepspeed"
    label = "deepspeed"  # in messages
    format = "deepspeed"
    multi_process = True
    casts_itself = True  # bf16/fp16 sections of its config, filled from mixed_precision
    stage = 2  # ZeRO stage, set by wrap()

    @classmethod
    def wrap(cls, loss_model, cfg, env, *, dtype, make_optimizer, scaler=None, moe=None) -> "DeepSpeedEngine":
        from mftcore.model.decoder import causal_lm, lm_head

        model = loss_model.model
        deepspeed = import_deepspeed(env.device)
        hidden_size = getattr(causal_lm(model).config, "hidden_size", 0)
        ds_config = fill_deepspeed_config(cfg, env.world_size, dtype, hidden_size)
        optimizer = make_optimizer(model, allow_fused=False)
        if offloads_optimizer(ds_config):
            optimizer = cpu_adam_like(optimizer, cfg)
        engine, _, _, _ = deepspeed.initialize(model=loss_model, optimizer=optimizer, config=ds_config,
                                               dist_init_required=False)
        if ds_config["zero_optimization"]["stage"] == 3:
            # The fused loss reads the LM head's weight directly, outside the head's own forward.
            for p in lm_head(model).parameters():
                deepspeed.zero.register_external_parameter(engine.module, p)
        out = cls(engine, model, optimizer, rank=env.rank, world_size=env.world_size, peft=cfg.peft_type is not None)
        out.stage = ds_config["zero_optimization"]["stage"]
        return out

    @contextlib.contextmanager
    def accumulate(self, last: bool):
        self.module.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss * self.world_size if self.world_size > 1 else loss, scale_wrt_gas=False)

    def step(self, max_grad_norm: float, total_loss: torch.Tensor) -> tuple:
        """DeepSpeed clips to gradient_clipping (our max_grad_norm) and skips a non-finite step itself."""
        self.module.step()
        norm = self.module.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None else float(norm))
        if self.module.was_step_applied():
            return grad_norm, 0
        if not torch.isfinite(total_loss):
            return grad_norm, 1
        return grad_norm, 3 if self.module.fp16_enabled() else 2

    def save(self, directory: str) -> None:
        self.module.save_checkpoint(directory, tag=TAG, save_latest=False, exclude_frozen_parameters=self.peft)

    def load(self, directory: str, saved: dict) -> None:
        if saved.get("world_size", 1) != self.world_size:
            raise ConfigError(f"resume_from_checkpoint: {directory}: DeepSpeed ZeRO checkpoints resume on as many "
                              f"ranks as saved them ({saved.get('world_size')}), not {self.world_size}")
        path, _ = self.module.load_checkpoint(directory, tag=TAG, load_module_strict=not self.peft,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"resume_from_checkpoint: {directory}: DeepSpeed found no checkpoint under {TAG}/")

    def full_state_dict(self):
        """ZeRO-3: the gathered weights on rank 0 (collective); ZeRO-2 keeps whole weights on every rank
        (None: rank 0's model is saved as it is)."""
        if self.stage != 3:
            return None
        sd = self.module._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=self.peft)
        return None if sd is None else strip_prefix(sd)

    @classmethod
    def load_weights(cls, directory: str, model, peft: bool) -> None:
        """A DeepSpeed checkpoint's fp32 weights into a plain model, in one process (zero_to_fp32)."""
        import_deepspeed(torch.device("cpu"))
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = strip_prefix(get_fp32_state_dict_from_zero_checkpoint(directory, tag=TAG, exclude_frozen_parameters=peft))
        result = model.load_state_dict(sd, strict=False)
        trained = {name for name, p in model.named_parameters() if p.requires_grad}  # a tied twin is named once
        missing = [k for k in result.missing_keys if k in trained]
        if missing or result.unexpected_keys:
            raise ConfigError(f"export: {directory}: the DeepSpeed checkpoint does not match the model "
                              f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")


    @classmethod
    def holds(cls, directory: str) -> bool:
        return os.path.isdir(os.path.join(directory, TAG))

    @classmethod
    def files_problem(cls, directory: str, state: dict) -> str | None:
        """deepspeed/: the model states and one optimizer-state file per rank, each a whole torch archive
        whose pickle names nothing beyond torch's weights_only set and DeepSpeed's own classes (DeepSpeed
        loads them with weights_only=False)."""
        from mftcore.integrity import torch_file_problem

        tag = os.path.join(directory, TAG)
        names = sorted(os.listdir(tag))
        optim = [n for n in names if n.endswith("optim_states.pt")]
        if not any(n.endswith("model_states.pt") for n in names):  # mp_rank_00_ (ZeRO-2), zero_pp_rank_<r>_ (3)
            return f"{TAG}/ holds no model states (mp_rank_00_model_states.pt) "
        world = int(state.get("world_size", 1)) if isinstance(state.get("world_size", 1), int) else 1
        if len(optim) < world:
            return f"{TAG}/ holds {len(optim)} optimizer-state files for {world} ranks"
        for name in names:
            if name.endswith(".pt"):
                problem = torch_file_problem(os.path.join(tag, name), allowed=DEEPSPEED_GLOBALS)
                if problem:
                    return f"{TAG}/{problem}"
        return None


# What DeepSpeed's checkpoint pickles name beyond torch's weights_only set (checked before DeepSpeed
# unpickles them without restriction): its own config enums and loss-scaler classes.
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


def strip_prefix(state_dict: dict, prefix: str = "model.") -> dict:
    """LossModel's keys ("model.<HF key>") -> the HF (or PEFT) model's own keys."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items()}
