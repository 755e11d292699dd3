"""The HF (or PEFT) model and the fused loss as one module: the unit that DDP, FSDP2 and DeepSpeed wrap.

Calling the decoder and the LM head weight from outside would bypass a wrapper's forward: DDP would
not prepare its gradient reduction, FSDP2 would not unshard the root's parameters (embeddings, final
norm, LM head), ZeRO-3 would not gather them. So the trainer and the evaluation call one module,
`LossModel`, whose forward runs decoder -> fused linear cross-entropy (-> MoE auxiliary loss) and returns
only small tensors, never logits. The fused op also counts the tokens whose argmax is the label, in the
same pass (evaluation reads them), and applies the head's logit transform (families.loss_options: Gemma2's
soft-cap, Cohere's and Granite's scales) from the model's config.

`batch_loss` / `head_loss` are the same computation as plain functions, for code that holds the bare
model (other trainers); the single-process numbers are identical either way.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mftcore.kernels import fused_linear_cross_entropy
from mftcore.model.decoder import lm_head, run_decoder
from mftcore.model.families import loss_options
from mftcore.model.moe import router_aux_loss


class LossOutput(NamedTuple):
    loss: torch.Tensor  # the cross-entropy (reduction of the call), MoE auxiliary loss excluded
    task_loss_sum: torch.Tensor  # [K] summed token cross-entropy
    task_token_count: torch.Tensor  # [K] loss tokens
    aux_loss: Optional[torch.Tensor] = None  # MoE load-balancing term, already scaled; None for dense models
    task_correct: Optional[torch.Tensor] = None  # [K] tokens whose argmax is the label (with_accuracy)


def head_loss(model, hidden, batch, num_tasks: int, loss_fn=fused_linear_cross_entropy, **loss_kwargs):
    """Fused linear + cross-entropy of final hidden states [B, L, H] against the LM head (loss_fn: the
    fused op, or its compiled form, mftcore/model/compile.py), with the head's logit transform."""
    head = lm_head(model)
    return loss_fn(
        hidden.flatten(0, 1), head.weight, batch.labels.flatten(), batch.task_ids.flatten(),
        bias=head.bias, num_tasks=num_tasks, **loss_options(model.config), **loss_kwargs)


def batch_loss(model, batch, num_tasks: int, loss_fn=fused_linear_cross_entropy, **loss_kwargs):
    """Decoder -> final hidden states -> fused linear + cross-entropy against the LM head."""
    return head_loss(model, run_decoder(model, batch).last_hidden_state, batch, num_tasks, loss_fn, **loss_kwargs)


class LossModel(torch.nn.Module):
    """forward(batch, token_scale=None, reduction="sum", moe=None, aux_divisor=1, with_accuracy=False)
    -> LossOutput. `model` is the HF causal LM or the PeftModel around it; its state dict keys appear
    under "model." here."""

    def __init__(self, model, num_tasks: int, loss_fn=fused_linear_cross_entropy):
        super().__init__()
        self.model, self.num_tasks = model, num_tasks
        self.loss_fn = loss_fn  # the fused op, or compiled (torch_compile)

    def forward(self, batch, token_scale=None, reduction: str = "sum", moe=None, aux_divisor: int = 1,
                with_accuracy: bool = False) -> LossOutput:
        kwargs = {"reduction": reduction}
        if token_scale is not None:
            kwargs["token_scale"] = token_scale
        aux = None
        if moe is None:
            out = batch_loss(self.model, batch, self.num_tasks, self.loss_fn, **kwargs)
        else:
            dec = run_decoder(self.model, batch, output_router_logits=True)
            out = head_loss(self.model, dec.last_hidden_state, batch, self.num_tasks, self.loss_fn, **kwargs)
            # A placeholder micro-batch (no real token, see data.batch.empty_batch) adds nothing.
            has_tokens = (batch.task_ids >= 0).any()
            aux = router_aux_loss(dec.router_logits, moe, batch.attention_mask) / aux_divisor * has_tokens
        return LossOutput(out.loss, out.task_loss_sum, out.task_token_count, aux_loss=aux,
                          task_correct=out.task_correct_count if with_accuracy else None)


def as_loss_model(model, num_tasks: int):
    """`model` itself when it already is (or wraps) a LossModel, else a LossModel around it."""
    if isinstance(model, LossModel) or isinstance(getattr(model, "module", None), LossModel):
        return model
    wrapper = LossModel(model, num_tasks)
    wrapper.training = model.training  # evaluation restores the model's own mode
    return wrapper
