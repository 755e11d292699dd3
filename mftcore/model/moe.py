"""Mixture-of-experts auxiliary loss: router_aux_loss_coef x HF's load-balancing loss (Switch
Transformer eq. 4-6), computed from the router logits the decoder returns, as MFTCoder adds it for
mixtral and qwen2_moe. Dense models get None and pay nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class MoeSpec:
    num_experts: int
    top_k: int
    coef: float


def moe_spec(model_config, coef: Optional[float] = None) -> Optional[MoeSpec]:
    """The router settings of an MoE config (mixtral: num_local_experts, qwen2_moe: num_experts), else None.
    `coef` overrides the config's router_aux_loss_coef; 0 switches the auxiliary loss off."""
    experts = getattr(model_config, "num_local_experts", None) or getattr(model_config, "num_experts", None)
    top_k = getattr(model_config, "num_experts_per_tok", None)
    if not experts or not top_k or not hasattr(model_config, "router_aux_loss_coef"):
        return None
    coef = model_config.router_aux_loss_coef if coef is None else coef
    return MoeSpec(int(experts), int(top_k), float(coef)) if coef else None


def router_aux_loss(router_logits, spec: MoeSpec, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """coef * load-balancing loss over all layers' router logits ([tokens, experts] each); padding
    positions are left out when the batch has an attention mask."""
    # The same function serves every HF MoE family (qwen2_moe's module holds an identical copy).
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    loss = load_balancing_loss_func(tuple(router_logits), spec.num_experts, spec.top_k, attention_mask)
    return spec.coef * loss
