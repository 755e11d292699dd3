"""The training loop: setup, then one visible loop of optimizer steps; evaluation, logging and
checkpointing are explicit calls in it.

    mftcore train configs/tiny.json [key=value ...]
"""

from __future__ import annotations

import math
import os
import time

import torch

from mftcore import checkpoint
from mftcore.config import TrainConfig
from mftcore.data import StepLoader, collate_padded, data_rank, load_tasks, report_lines
from mftcore.data.chat_template import build_chat_template
from mftcore.errors import ConfigError
from mftcore.kernels import fused_linear_cross_entropy
from mftcore.loss import step_token_scales, task_scales
from mftcore.metrics import Metrics
from mftcore.model import hidden_states, load_model, load_tokenizer


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters), unlike MFTCoder."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup to learning_rate, then cosine (or linear, or constant) down to min_lr at total_steps."""
    warmup = cfg.num_warmup_steps
    warmup = int(warmup * total_steps) if isinstance(warmup, float) else warmup
    floor = cfg.min_lr / cfg.learning_rate

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler_type in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.lr_scheduler_type == "linear":
            return 1 - (1 - floor) * progress
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_loss(model, batch, num_tasks: int, **loss_kwargs):
    """Decoder -> final hidden states -> fused linear + cross-entropy against the LM head."""
    hidden = hidden_states(model, batch)
    head = model.get_output_embeddings()
    return fused_linear_cross_entropy(
        hidden.flatten(0, 1), head.weight, batch.labels.flatten(), batch.task_ids.flatten(),
        bias=head.bias, num_tasks=num_tasks, **loss_kwargs)


def train_step(model, batches, optimizer, scheduler, cfg: TrainConfig, num_tasks: int, weights):
    """One optimizer step over its micro-batches, normalised as case3 over all of them."""
    scales, counts = step_token_scales(batches, cfg.weighted_loss_mode, num_tasks, weights)
    loss = torch.zeros((), device=counts.device)
    task_sum = torch.zeros(num_tasks, device=counts.device)
    for b, scale in zip(batches, scales):
        out = batch_loss(model, b, num_tasks, reduction="sum", token_scale=scale)
        out.loss.backward()
        loss += out.loss.detach()
        task_sum += out.task_loss_sum
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, task_sum, counts, grad_norm


@torch.no_grad()
def evaluate(model, samples, cfg: TrainConfig, pad_id: int, num_tasks: int, weights, device):
    """Per-task token-mean validation loss, and their case3 combination."""
    model.eval()
    task_sum = torch.zeros(num_tasks, device=device)
    counts = torch.zeros(num_tasks, device=device)
    bs = cfg.per_device_eval_batch_size
    for i in range(0, len(samples), bs):
        out = batch_loss(model, collate_padded(samples[i:i + bs], pad_id).to(device), num_tasks, reduction="sum")
        task_sum += out.task_loss_sum
        counts += out.task_token_count
    model.train()
    scales = task_scales(counts, weights)
    return float((scales * task_sum).sum()), task_sum, counts


def per_task(names, task_sum, counts) -> dict:
    return {n: float(s / c) for n, s, c in zip(names, task_sum.tolist(), counts.tolist()) if c > 0}


def train(cfg: TrainConfig) -> str:
    """Run training to the end; returns the directory of the final model."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("WORLD_SIZE > 1: multi-process training is not supported yet (one process only)")
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tokenizer = load_tokenizer(cfg)
    pad_id = tokenizer.eos_token_id  # MFTCoder pads with EOS; padding never reaches the loss
    data = load_tasks(cfg, tokenizer, tokenizer.eos_token_id)
    names, K = data.names, len(data.names)
    weights = None if cfg.task_weights is None else torch.tensor(cfg.task_weights, device=device)

    model = load_model(cfg, len(tokenizer)).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    rank, world_size = data_rank()
    loader = StepLoader(data.train, batch_size=cfg.per_device_train_batch_size,
                        accumulation=cfg.gradient_accumulation_steps, pad_id=pad_id, seed=cfg.seed,
                        rank=rank, world_size=world_size, pack=cfg.padding_mode == "pack", seq_length=cfg.seq_length)
    total_steps = cfg.max_train_steps or cfg.num_train_epochs * loader.steps_per_epoch()
    scheduler = build_scheduler(optimizer, cfg, total_steps)

    metrics = Metrics(cfg.output_dir, cfg.tb_dir, total_steps)
    for line in report_lines(data, cfg):
        metrics.print(line)
    n_params = sum(p.numel() for p in model.parameters())
    metrics.print(f"model: {n_params / 1e6:.2f}M parameters; {total_steps} steps on {device}")

    batches = iter(loader)
    tokens, t0 = 0, time.perf_counter()
    for step in range(1, total_steps + 1):
        epoch, micro = next(batches)
        tokens += sum(b.num_tokens for b in micro)  # counted on the host, before the copy
        micro = [b.to(device) for b in micro]
        lr = scheduler.get_last_lr()[0]
        loss, task_sum, counts, grad_norm = train_step(model, micro, optimizer, scheduler, cfg, K, weights)
        metrics.advance({"loss": f"{float(loss):.4f}"})

        if step % cfg.log_interval == 0 or step == total_steps:
            elapsed = time.perf_counter() - t0
            metrics.write(step, "train", {"loss": float(loss), "lr": lr, "grad_norm": float(grad_norm),
                                          "epoch": epoch, "tokens_per_s": tokens / elapsed},
                          per_task(names, task_sum, counts))
            tokens, t0 = 0, time.perf_counter()
        if cfg.evaluation_steps and data.valid and (step % cfg.evaluation_steps == 0 or step == total_steps):
            vloss, vsum, vcount = evaluate(model, data.valid, cfg, pad_id, K, weights, device)
            metrics.write(step, "valid", {"loss": vloss}, per_task(names, vsum, vcount))
        epoch_end = loader.state_dict()["step_in_epoch"] == loader.steps_per_epoch()
        if ((cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0) or step == total_steps
                or (cfg.epoch_checkpointing and epoch_end)):
            checkpoint.save_checkpoint(cfg.output_dir, step, model, optimizer, scheduler,
                                       {"data": loader.state_dict()})

    tokenizer.chat_template = build_chat_template(cfg.role_markers)  # apply_chat_template == training string
    final = checkpoint.save_final(cfg.output_dir, model, tokenizer, cfg.to_dict())
    metrics.print(f"saved {final}")
    metrics.close()
    return final
