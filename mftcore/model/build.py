"""The model ready to train: loaded in the precision the config asks for, quantized and adapted, with
activation checkpointing. Functions applied to an untouched model, in order, by `build_model`:

    load (fp32, or the half dtype for a frozen LoRA base, or nf4 for QLoRA)
    -> prepare for k-bit training (QLoRA) -> add LoRA adapters -> activation checkpointing
    -> torch.compile of each decoder layer (torch_compile)
"""

from __future__ import annotations

import torch

from mftcore.errors import ConfigError
from mftcore.model.compile import compile_layers
from mftcore.model.decoder import causal_lm
from mftcore.model.load import load_model
from mftcore.model.lora import add_adapters

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(cfg, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: cfg.mixed_precision, where "auto" is bf16 on a GPU that has it, else fp32."""
    if cfg.mixed_precision != "auto":
        return DTYPES[cfg.mixed_precision]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(cfg, dtype: torch.dtype):
    """QLoRA: 4-bit NormalFloat weights with double quantisation, matmuls in the compute dtype."""
    if cfg.peft_type != "qlora":
        return None
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it; say so in our words)
    except ImportError:
        raise ConfigError("peft_type: \"qlora\" needs bitsandbytes (pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def storage_dtype(cfg, dtype: torch.dtype) -> torch.dtype:
    """Weights are stored in fp32 where they train (full fine-tuning keeps fp32 master weights and
    autocasts); a frozen LoRA base is stored in the compute dtype, half the memory."""
    return dtype if cfg.peft_type == "lora" else torch.float32


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant, so a frozen embedding is fine)."""
    if not enabled:
        return
    lm = causal_lm(model)
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_model(cfg, vocab_size: int, device: torch.device, *, place: bool = True):
    """The model ready to train on `device`. place=False leaves an unquantized model on the CPU, for
    FSDP2, which moves each shard to `device` as it shards (a full copy per GPU would otherwise be the
    memory peak)."""
    dtype = compute_dtype(cfg, device)
    quant = quantization_config(cfg, dtype)
    # transformers places a quantized model itself (device_map); the rest is moved after loading.
    model = load_model(cfg, vocab_size, dtype=storage_dtype(cfg, dtype), quantization_config=quant,
                       device_map=None if quant is None else {"": str(device)})
    if quant is None and place:
        model = model.to(device)
    if cfg.peft_type is not None:
        model = add_adapters(model, cfg)
    set_activation_checkpointing(model, cfg.gradient_checkpointing)
    if cfg.torch_compile:
        compile_layers(model)
    model.train()
    return model
