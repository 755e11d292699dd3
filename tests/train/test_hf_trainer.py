"""The README recipe: MFTLoss inside a plain HF Trainer (compute_loss override) on a tiny Llama."""

import inspect
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from mftcore.kernels.cross_entropy import masked_cross_entropy_reference
from mftcore.loss import MFTLoss
from tests.helpers.paths import ROOT

K, VOCAB = 3, 40


class MFTTrainer(Trainer):
    """The recipe of README.md ("Using the loss in another trainer"), verbatim."""

    loss_is_scaled_for_ga = False  # MFTLoss normalises each micro-batch: let Trainer divide by the GA steps

    def __init__(self, *args, mft_loss: MFTLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.mft_loss = mft_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, task_ids = inputs.pop("labels"), inputs.pop("task_ids")  # task_ids: [B] or [B, L]
        decoder = getattr(model, model.base_model_prefix)  # the model without its LM head
        hidden = decoder(**inputs).last_hidden_state
        labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # HF labels are unshifted: align with hidden
        head = model.get_output_embeddings()
        out = self.mft_loss(hidden, head.weight, labels, task_ids, bias=head.bias)
        return (out.loss, out) if return_outputs else out.loss


def make_dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(5, 14, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2] = -100  # the prompt has no loss
        rows.append({"input_ids": ids, "labels": labels, "task_ids": torch.tensor(i % K if i % 7 else 1)})
    return rows


def collate(rows):
    L = max(len(r["input_ids"]) for r in rows)
    pad = lambda t, v: F.pad(t, (0, L - len(t)), value=v)  # noqa: E731
    return {"input_ids": torch.stack([pad(r["input_ids"], 0) for r in rows]),
            "attention_mask": torch.stack([pad(torch.ones_like(r["input_ids"]), 0) for r in rows]),
            "labels": torch.stack([pad(r["labels"], -100) for r in rows]),
            "task_ids": torch.stack([r["task_ids"] for r in rows])}


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def oracle_case3(model, batch, weights):
    """case3 from the model's own logits (HF forward, HF label shift), cross-entropy in float64."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    tasks = batch["task_ids"].unsqueeze(1).expand_as(labels)
    return masked_cross_entropy_reference(logits.flatten(0, 1), labels.flatten(), tasks.flatten(), num_tasks=K,
                                          task_weights=weights).loss


def test_mft_loss_gives_the_models_own_case3_loss_and_gradient(tmp_path):
    weights = [1.0, 2.0, 0.5]
    model, batch = tiny_model(), collate(make_dataset()[:6])
    want = oracle_case3(model, batch, weights)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    trainer = MFTTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                         mft_loss=MFTLoss(K, mode="case3", task_weights=weights))
    got = trainer.compute_loss(model, dict(batch))
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for name, p in model.named_parameters():
        scale = want_grads[name].abs().max().item()  # errors relative to the largest gradient
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-5 * scale)


def test_trainer_trains_with_gradient_accumulation(tmp_path):
    model = tiny_model()
    head_before = model.lm_head.weight.detach().clone()
    seen = []

    class Recording(MFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            seen.append(loss.item())
            return loss

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=4, learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0)
    trainer = Recording(model=model, args=args, train_dataset=make_dataset(), data_collator=collate,
                        mft_loss=MFTLoss(K, mode="case4"))
    trainer.train()
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(seen) == 8 and len(logged) == 4
    # Trainer logs the mean of the step's micro-batch losses: our loss reached it, divided by GA once.
    assert logged[0] == pytest.approx((seen[0] + seen[1]) / 2, rel=1e-4)
    assert not torch.equal(model.lm_head.weight.detach(), head_before)


def test_readme_recipe_is_this_class():
    readme = open(os.path.join(ROOT, "README.md")).read()
    body = inspect.getsource(MFTTrainer).split('"""', 2)[2].lstrip("\n")  # the class after its docstring
    assert "class MFTTrainer(Trainer):" in readme and body in readme
