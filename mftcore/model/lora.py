"""LoRA and QLoRA adapters through peft: the targets from the config or the family table, and the
PeftModel around the model (its base frozen).

Memory: peft computes an adapter as lora_B(lora_A(dropout(x))), so each adapted linear keeps for the
backward its own dropped copy of x (plus the mask) and the rank-r intermediate lora_A(x): seven copies of
the layer's inputs per Llama layer that full fine-tuning does not keep (it saves x once, shared by q/k/v).
`LowMemoryLora` (registered as the adapters' peft "variant") computes the same function in one autograd
Function that saves only x, which the base layer's neighbours keep anyway, and the dropout seed, and
recomputes the mask and the intermediate in the backward (one rank-r matmul more). Measured with
saved_tensors_hooks on the test model: tests/train/test_memory.py. MFTCORE_LOW_MEMORY_LORA=0 keeps peft's
own path (the "before" of bench/bench_memory.py).
"""

from __future__ import annotations

import os

import torch

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
        model = get_peft_model(model, lora)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise ConfigError(f"target_modules: {e}") from None
    use_low_memory_lora(model)
    return model


def use_low_memory_lora(model) -> int:
    """Route every plain LoRA linear (not 4-bit, no other variant) through LowMemoryLora; the count
    (0 with MFTCORE_LOW_MEMORY_LORA=0: peft's own path, see the module docstring)."""
    from peft.tuners.lora.layer import Linear

    if os.environ.get("MFTCORE_LOW_MEMORY_LORA", "").strip() == "0":
        return 0

    n = 0
    for module in model.modules():
        if type(module) is Linear:  # exactly peft's Linear: bnb's 4-bit subclasses keep peft's path
            for name in module.lora_A:
                if name not in module.lora_variant:
                    module.lora_variant[name] = LowMemoryLora()
                    n += 1
    return n


def drop(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x with dropout p, the mask drawn from `seed` (the same mask again for the same seed)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    keep = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=gen)
    return x * keep / (1 - p)


class LoraDelta(torch.autograd.Function):
    """(dropout_p(x) @ A.T) @ B.T * scaling, saving x and the seed only."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, a, b, scaling: float, p: float, seed: int):
        ctx.save_for_backward(x, a, b)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        xd = drop(x, p, seed) if p > 0 else x
        return (xd @ a.t()) @ b.t() * scaling

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        x, a, b = ctx.saved_tensors
        xd = drop(x, ctx.p, ctx.seed) if ctx.p > 0 else x
        g = (grad * ctx.scaling).reshape(-1, grad.shape[-1])
        x2 = xd.reshape(-1, x.shape[-1])
        h = x2 @ a.t().to(x2.dtype)
        grad_b = (g.t().to(h.dtype) @ h).to(b.dtype) if ctx.needs_input_grad[2] else None
        gh = g @ b.to(g.dtype)
        grad_a = (gh.t().to(x2.dtype) @ x2).to(a.dtype) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (gh @ a.to(gh.dtype)).reshape(x.shape).to(x.dtype)
            if ctx.p > 0:  # the mask again: d(x * keep / (1 - p)) / dx
                grad_x = drop(torch.ones_like(x), ctx.p, ctx.seed) * grad_x
        return grad_x, grad_a, grad_b, None, None, None


class LowMemoryLora:
    """peft's LoRA variant interface (forward, merge); merging is vanilla LoRA's."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        pass

    def supports_lora_conversion(self) -> bool:
        return True

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight):
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight):
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x, result, **kwargs):
        a, b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
        p = dropout.p if module.training and isinstance(dropout, torch.nn.Dropout) else 0.0
        if torch.compiler.is_compiling() or b.bias is not None:  # a seed read would break the graph: peft's way
            return result + b(a(dropout(x))) * scaling
        # The seed from the CPU generator: checkpointed layers replay it (preserve_rng_state), resumes restore it.
        seed = int(torch.randint(0, 2**62, ())) if p > 0 else 0
        return result + LoraDelta.apply(x, a.weight, b.weight, scaling, p, seed)


def is_adapter_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
