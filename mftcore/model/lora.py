"""LoRA and QLoRA adapters through peft: the targets from the config or the family table, and the
PeftModel around the model (its base frozen)."""

from __future__ import annotations

from mftcore.errors import ConfigError
from mftcore.model.families import lora_target_modules


def lora_targets(cfg):
    """cfg.target_modules, else the family's targets (model/families.py), else peft's "all-linear"."""
    return lora_target_modules(cfg.model_type) if cfg.target_modules is None else cfg.target_modules


def add_adapters(model, cfg):
    """Wrap the model as a PeftModel with LoRA adapters (fp32 adapter weights); the base is frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.peft_type == "qlora":
        # Freezes the base and upcasts its non-quantized weights (norms, embeddings) to fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = lora_targets(cfg)
    head = model.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    if not isinstance(targets, str) and head_names & set(targets):
        # The fused loss multiplies by the head's weight directly; an adapter on it would be ignored.
        raise ConfigError(f"target_modules: the LM head ({sorted(head_names)[0]}) cannot take a LoRA adapter")
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise ConfigError(f"target_modules: {e}") from None


def is_adapter_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
