"""The HF (or PEFT) model and the fused loss as one module: the unit that DDP, FSDP2 and DeepSpeed wrap.

Calling the decoder and the LM head weight from outside would bypass a wrapper's forward: DDP would
not prepare its gradient reduction, FSDP2 would not unshard the root's parameters (embeddings, final
norm, LM head), ZeRO-3 would not gather them. So the trainer and the evaluation call one module,
`LossModel`, whose forward runs decoder -> fused linear cross-entropy (-> MoE auxiliary loss, -> the
tokens whose argmax is the label, for evaluation) and returns only small tensors, never logits.

`batch_loss` / `head_loss` are the same computation as plain functions, for code that holds the bare
model (other trainers); the single-process numbers are identical either way.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mftcore.data.batch import IGNORE_INDEX
from mftcore.kernels import fused_linear_cross_entropy
from mftcore.model.decoder import lm_head, run_decoder
from mftcore.model.moe import router_aux_loss

LOGIT_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of fp32 logits per chunk when counting correct tokens


class LossOutput(NamedTuple):
    loss: torch.Tensor  # the cross-entropy (reduction of the call), MoE auxiliary loss excluded
    task_loss_sum: torch.Tensor  # [K] summed token cross-entropy
    task_token_count: torch.Tensor  # [K] loss tokens
    aux_loss: Optional[torch.Tensor] = None  # MoE load-balancing term, already scaled; None for dense models
    task_correct: Optional[torch.Tensor] = None  # [K] tokens whose argmax is the label (with_accuracy)


def head_loss(model, hidden, batch, num_tasks: int, loss_fn=fused_linear_cross_entropy, **loss_kwargs):
    """Fused linear + cross-entropy of final hidden states [B, L, H] against the LM head (loss_fn: the
    fused op, or its compiled form, mftcore/model/compile.py)."""
    head = lm_head(model)
    return loss_fn(
        hidden.flatten(0, 1), head.weight, batch.labels.flatten(), batch.task_ids.flatten(),
        bias=head.bias, num_tasks=num_tasks, **loss_kwargs)


def batch_loss(model, batch, num_tasks: int, loss_fn=fused_linear_cross_entropy, **loss_kwargs):
    """Decoder -> final hidden states -> fused linear + cross-entropy against the LM head."""
    return head_loss(model, run_decoder(model, batch).last_hidden_state, batch, num_tasks, loss_fn, **loss_kwargs)


def count_correct(hidden: torch.Tensor, head, labels: torch.Tensor, task_ids: torch.Tensor, num_tasks: int):
    """[K] count of loss tokens whose argmax logit is the label, logits built chunk by chunk."""
    valid = labels != IGNORE_INDEX
    h, y, t = hidden[valid], labels[valid], task_ids[valid]
    correct = torch.zeros(num_tasks, device=hidden.device)
    rows = max(1, LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])
    for i in range(0, h.shape[0], rows):
        logits = torch.nn.functional.linear(h[i:i + rows], head.weight, head.bias)
        hit = (logits.argmax(-1) == y[i:i + rows]).float()
        correct.index_add_(0, t[i:i + rows], hit)
    return correct


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
        if moe is None and not with_accuracy:
            return LossOutput(*batch_loss(self.model, batch, self.num_tasks, self.loss_fn, **kwargs))
        dec = run_decoder(self.model, batch, **({"output_router_logits": True} if moe is not None else {}))
        hidden = dec.last_hidden_state
        out = head_loss(self.model, hidden, batch, self.num_tasks, self.loss_fn, **kwargs)
        aux = correct = None
        if moe is not None:
            # A placeholder micro-batch (no real token, see data.batch.empty_batch) adds nothing.
            has_tokens = (batch.task_ids >= 0).any()
            aux = router_aux_loss(dec.router_logits, moe, batch.attention_mask) / aux_divisor * has_tokens
        if with_accuracy:
            correct = count_correct(hidden.flatten(0, 1), lm_head(self.model), batch.labels.flatten(),
                                    batch.task_ids.flatten(), self.num_tasks)
        return LossOutput(*out, aux_loss=aux, task_correct=correct)


def as_loss_model(model, num_tasks: int):
    """`model` itself when it already is (or wraps) a LossModel, else a LossModel around it."""
    if isinstance(model, LossModel) or isinstance(getattr(model, "module", None), LossModel):
        return model
    wrapper = LossModel(model, num_tasks)
    wrapper.training = model.training  # evaluation restores the model's own mode
    return wrapper
