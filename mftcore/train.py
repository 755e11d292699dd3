"""The training loop: setup, then one visible loop of optimizer steps; evaluation, logging, weighting
updates and checkpointing are explicit calls in it.

    mftcore train configs/tiny.json [key=value ...]

Everything a step depends on (weights, optimizer, scheduler, scaler, RNG, data position, the dynamic
weighting and validation-sampler positions, best/stall counters) is in each checkpoint, so a run
resumed from checkpoint-N ends bitwise equal to one that never stopped (on CPU; tested).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import threading
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from mftcore import checkpoint, distributed
from mftcore.config import DYNAMIC_WEIGHTING_MODES, TrainConfig
from mftcore.data import StepLoader, load_tasks, report_lines
from mftcore.data.chat_template import build_chat_template
from mftcore.errors import ConfigError, TrainingError, TrainingInterrupted
from mftcore.evaluate import ValidationSampler, evaluate, evaluate_batches
from mftcore.loss import step_token_scales
from mftcore.metrics import (Metrics, Window, attention_width, matmul_params, peak_flops, peak_memory_gb,
                             step_flops, sum_squared_doc_lengths)
from mftcore.model import causal_lm, load_tokenizer
from mftcore.model.adapters import build_model, compute_dtype
from mftcore.model.loss_model import LossModel, batch_loss, head_loss  # noqa: F401 (batch_loss, head_loss: public here)
from mftcore.model.moe import moe_spec
from mftcore.weighting import CoBa, build_weighting, sampling_schedule


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
    floor = cfg.min_lr / cfg.learning_rate if cfg.learning_rate > 0 else 0.0  # lr 0: evaluation-only runs

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


@dataclass
class StepResult:
    loss: torch.Tensor  # the step's loss (case3 of all its micro-batches), MoE auxiliary loss excluded
    task_sum: torch.Tensor  # [K] summed token cross-entropy
    counts: torch.Tensor  # [K] loss tokens
    grad_norm: torch.Tensor
    aux_loss: Optional[torch.Tensor]  # the MoE load-balancing term (already times its coefficient)
    skipped: Optional[str]  # None, or why the update was skipped: "loss", "gradient", "fp16 overflow"

    def __iter__(self):  # unpacks as train_step's earlier result: loss, task_sum, counts, grad_norm
        return iter((self.loss, self.task_sum, self.counts, self.grad_norm))


def train_step(model, batches, optimizer, scheduler, cfg: TrainConfig, num_tasks: int, weights, *,
               scaler=None, moe=None, autocast=contextlib.nullcontext, engine=None) -> StepResult:
    """One optimizer step over its micro-batches, normalised over all of them (and all ranks); a
    non-finite loss or gradient leaves the weights untouched (the schedule still advances, so lr stays
    a function of step). `engine` (distributed.Engine) runs it under DDP, FSDP2 or DeepSpeed; without
    one, `model` is a bare HF model trained in this process with `optimizer` and `scaler`."""
    if engine is None:
        engine = distributed.Engine(LossModel(model, num_tasks), model, optimizer, scaler=scaler)
    mode = "case3" if cfg.weighted_loss_mode in DYNAMIC_WEIGHTING_MODES else cfg.weighted_loss_mode
    scales, counts = step_token_scales(batches, mode, num_tasks, weights)
    loss = torch.zeros((), device=counts.device)
    aux_total = torch.zeros((), device=counts.device) if moe is not None else None
    task_sum = torch.zeros(num_tasks, device=counts.device)
    for i, (b, scale) in enumerate(zip(batches, scales)):
        with engine.accumulate(last=i == len(batches) - 1):
            with autocast():
                out = engine.module(b, token_scale=scale, moe=moe, aux_divisor=len(batches) * engine.world_size)
                total = out.loss if moe is None else out.loss + out.aux_loss
            engine.backward(total)
        loss += out.loss.detach()
        task_sum += out.task_loss_sum
        if moe is not None:
            aux_total += out.aux_loss.detach()
    # Each rank holds its share of the step: the logged loss and the skip decision need the sum.
    if moe is None:
        loss, task_sum = distributed.sum_over_ranks(loss, task_sum)
    else:
        loss, task_sum, aux_total = distributed.sum_over_ranks(loss, task_sum, aux_total)
    total_loss = loss if aux_total is None else loss + aux_total
    grad_norm, skipped = engine.update(cfg.max_grad_norm, total_loss)
    with warnings.catch_warnings():  # a skipped update still advances the schedule, on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()
    return StepResult(loss, task_sum, counts, grad_norm, aux_total, skipped)


@dataclass
class TrainerState:
    """The loop's own counters; saved in trainer_state.json with the data and weighting positions."""
    step: int = 0
    best_loss: Optional[float] = None
    best_step: Optional[int] = None
    stall: int = 0
    early_stopped: bool = False
    skipped_steps: int = 0
    overflow_steps: int = 0
    nonfinite_in_a_row: int = 0


class StopRequest:
    """SIGTERM sets a flag; the loop finishes the current step, saves a checkpoint and stops."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def per_task(names, values) -> dict:
    return {n: v for n, v in zip(names, values) if v is not None}


def train(cfg: TrainConfig) -> str:
    """Run training to the end; returns the directory of the final model (or adapter). Under torchrun
    every rank runs this; the engine is cfg.distributed_type (mftcore/distributed.py)."""
    env = distributed.setup(cfg)
    try:
        return train_on(cfg, env)
    finally:
        distributed.teardown(env)


def train_on(cfg: TrainConfig, env: distributed.Dist) -> str:
    rank, world_size, device = env.rank, env.world_size, env.device
    torch.manual_seed(cfg.seed)
    resume_from = checkpoint.resolve_resume(cfg)
    if rank == 0:
        checkpoint.remove_leftovers(cfg.output_dir)

    tokenizer = load_tokenizer(cfg)
    pad_id = tokenizer.eos_token_id  # MFTCoder pads with EOS; padding never reaches the loss
    data = load_tasks(cfg, tokenizer, tokenizer.eos_token_id)
    distributed.join(env, cfg)  # after the data: tokenizing forks, which a process should do before threads run
    names, K = data.names, len(data.names)
    if cfg.weighted_loss_mode in DYNAMIC_WEIGHTING_MODES and not data.valid:
        raise ConfigError(f"data_split: weighted_loss_mode {cfg.weighted_loss_mode!r} needs validation data")
    static_weights = None if cfg.task_weights is None else torch.tensor(cfg.task_weights, device=device)

    dtype = compute_dtype(cfg, device)
    # One process and DDP autocast over fp32 weights; FSDP2's policy and DeepSpeed cast the weights themselves.
    own_precision = env.engine in ("none", "ddp")
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype,
                                 enabled=own_precision and dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 and own_precision else None
    model = build_model(cfg, len(tokenizer), device, place=env.engine != "fsdp")
    lm = causal_lm(model)
    moe = moe_spec(lm.config, cfg.router_aux_loss_coef)
    n_params = sum(p.numel() for p in model.parameters())  # before sharding, which hides sizes from ZeRO-3
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flop_params, attn = matmul_params(lm), attention_width(lm)
    engine = distributed.wrap_model(model, cfg, env, num_tasks=K, dtype=dtype, scaler=scaler, moe=moe,
                                    make_optimizer=functools.partial(build_optimizer, cfg=cfg))
    optimizer = engine.optimizer
    loader = StepLoader(data.train, batch_size=cfg.per_device_train_batch_size,
                        accumulation=cfg.gradient_accumulation_steps, pad_id=pad_id, seed=cfg.seed,
                        rank=rank, world_size=world_size, pack=cfg.padding_mode == "pack", seq_length=cfg.seq_length)
    total_steps = cfg.max_train_steps or cfg.num_train_epochs * loader.steps_per_epoch()
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    weighting = build_weighting(cfg, K)
    interval, samples_per_update = sampling_schedule(cfg)
    sampler = ValidationSampler(data.valid, cfg.per_device_eval_batch_size, pad_id) if weighting else None
    state = TrainerState()
    if resume_from:
        saved = checkpoint.load_checkpoint(resume_from, engine, scheduler)
        restore_trainer(saved, state, loader, weighting, sampler, cfg, resume_from)
        checkpoint.restore_checkpoint_rng(resume_from, rank)  # last: nothing after this draws before step 1

    metrics = Metrics(cfg.output_dir, cfg.tb_dir, total_steps, initial_step=state.step, enabled=rank == 0)
    for line in report_lines(data, cfg):
        metrics.print(line)
    on = f"{device}" if world_size == 1 else f"{world_size} ranks ({env.engine}, {device.type})"
    metrics.print(f"model: {n_params / 1e6:.2f}M parameters, {n_trained / 1e6:.2f}M trained "
                  f"({cfg.peft_type or 'full'}, {str(dtype).removeprefix('torch.')}); {total_steps} steps on {on}")
    shard = dict(rank=rank, world_size=world_size)
    evaluate_valid = functools.partial(evaluate, engine.module, data.valid, batch_size=cfg.per_device_eval_batch_size,
                                       pad_id=pad_id, num_tasks=K, device=device, autocast=autocast, **shard)
    if resume_from:
        metrics.print(f"resumed from {resume_from} at step {state.step}")
        if saved.get("world_size", 1) != world_size:
            metrics.print(f"note: the checkpoint was saved by {saved.get('world_size', 1)} ranks, this run has "
                          f"{world_size}: dropout draws from other random streams than that run's would have")
        if saved.get("total_steps") != total_steps:
            metrics.print(f"note: {total_steps} steps in all, the checkpoint's run planned {saved.get('total_steps')}: "
                          f"the learning-rate schedule from here differs from that run's")
    elif isinstance(weighting, CoBa):  # the loss ratios are relative to the losses before training
        weighting.set_initial(evaluate_valid().task_losses())

    peak = peak_flops(device, dtype, cfg.peak_tflops)
    window = Window(K, peak * world_size if peak else None)  # tokens and FLOPs below are over all ranks
    batches = iter(loader)
    with StopRequest() as stop:
        while state.step < total_steps and not state.early_stopped:
            epoch, micro = next(batches)
            tokens = sum(b.num_tokens for b in micro)  # counted on the host, before the copy
            sq_lengths = sum(map(sum_squared_doc_lengths, micro))
            micro = [b.to(device) for b in micro]
            weights = static_weights if weighting is None else torch.tensor(weighting.weights(), device=device)
            lr = scheduler.get_last_lr()[0]
            res = train_step(model, micro, optimizer, scheduler, cfg, K, weights, scaler=scaler, moe=moe,
                             autocast=autocast, engine=engine)
            # All ranks' tokens, and whether any rank has had a SIGTERM (all stop after the same step).
            tokens, sq_lengths, stopping = distributed.sum_numbers([tokens, sq_lengths, stop.requested], device)
            window.add_step(tokens, step_flops(flop_params, attn, tokens, sq_lengths))
            state.step += 1
            step = state.step
            window.add_losses(res.task_sum, res.counts)
            diverged = count_skipped(res, state, cfg, metrics, step)
            metrics.advance({"loss": f"{float(res.loss):.4f}", "lr": f"{lr:.2e}"})

            if weighting is not None and step % interval == 0:
                measured = evaluate_batches(engine.module, sampler.next_batches(samples_per_update), K, device,
                                            autocast, pad_id=pad_id, **shard)
                weighting.observe(step, measured.task_losses())
            if step % cfg.log_interval == 0 or step == total_steps:
                log_train(metrics, step, epoch, lr, res, state, window, weighting, names, device)
            improved = False
            if cfg.evaluation_steps and data.valid and (step % cfg.evaluation_steps == 0 or step == total_steps):
                improved = log_evaluation(metrics, step, evaluate_valid(), state, cfg, names)

            periodic = cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0
            epoch_end = cfg.epoch_checkpointing and loader.state_dict()["step_in_epoch"] == loader.steps_per_epoch()
            if (periodic or epoch_end or step == total_steps or improved or state.early_stopped or stopping
                    or diverged):
                path = checkpoint.save_checkpoint(
                    cfg.output_dir, step, engine, scheduler,
                    trainer_state(state, loader, weighting, sampler, cfg, total_steps), config=cfg.to_dict())
                if rank == 0:
                    checkpoint.prune_checkpoints(cfg.output_dir, cfg.saving_limit, {state.best_step, step})
                if diverged:
                    metrics.close()
                    raise TrainingError(
                        f"{state.nonfinite_in_a_row} steps in a row had a non-finite {res.skipped} (the last at step "
                        f"{step}; max_consecutive_nonfinite={cfg.max_consecutive_nonfinite}); stopped with {path}. "
                        f"Lower learning_rate or check the data, then resume")
                if stopping:
                    metrics.close()
                    raise TrainingInterrupted(f"stopped by SIGTERM after step {step}; checkpoint saved to {path} "
                                              f"(resume with resume_from_checkpoint=auto)")

    tokenizer.chat_template = build_chat_template(cfg.role_markers)  # apply_chat_template == training string
    final = checkpoint.save_final(cfg.output_dir, engine, tokenizer, cfg.to_dict())
    if state.best_step is not None:
        metrics.print(f"best validation loss {state.best_loss:.4f} at step {state.best_step} "
                      f"({os.path.join(cfg.output_dir, f'checkpoint-{state.best_step}')})")
    metrics.print(f"saved {final}")
    metrics.close()
    return final


def log_train(metrics: Metrics, step: int, epoch: int, lr: float, res: StepResult, state: TrainerState,
              window: Window, weighting, names, device) -> None:
    """One train record: this step's loss, lr and gradient norm; loss and tokens per task, throughput
    and MFU over the steps since the last record; the dynamic task weights."""
    scalars = {"loss": float(res.loss), "lr": lr, "grad_norm": float(res.grad_norm), "epoch": epoch,
               **window.rates(), "memory_gb": peak_memory_gb(device), "skipped_steps": state.skipped_steps}
    if res.aux_loss is not None:
        scalars["aux_loss"] = float(res.aux_loss)
    extra = {"task_tokens": per_task(names, window.task_count.tolist())}
    for key, value in (weighting.log_values() if weighting is not None else {}).items():
        if isinstance(value, list):
            extra[key] = per_task(names, value)
        else:
            scalars[key] = value
    metrics.write(step, "train", scalars, per_task(names, window.task_losses()), extra)
    window.reset()


def log_evaluation(metrics: Metrics, step: int, result, state: TrainerState, cfg: TrainConfig, names) -> bool:
    """Log a validation result and track the best loss and early stopping; True on a new best."""
    vloss = result.combined_loss(cfg.task_weights)
    improved = state.best_loss is None or vloss < state.best_loss
    if improved:
        state.best_loss, state.best_step, state.stall = vloss, step, 0
    else:
        state.stall += 1
        state.early_stopped = cfg.early_stopping and state.stall >= cfg.early_stopping_stall_num
    metrics.write(step, "valid", {"loss": vloss, "accuracy": result.accuracy()}, per_task(names, result.task_losses()),
                  {"task_accuracy": per_task(names, result.task_accuracy()),
                   "task_tokens": per_task(names, result.task_count.tolist())})
    if state.early_stopped:
        metrics.print(f"early stopping at step {step}: no better validation loss in {state.stall} evaluations "
                      f"(best {state.best_loss:.4f} at step {state.best_step})")
    return improved


def count_skipped(res: StepResult, state: TrainerState, cfg: TrainConfig, metrics: Metrics, step: int) -> bool:
    """Count a skipped update; True when more than max_consecutive_nonfinite were skipped in a row.
    fp16 overflows are the loss scaler calibrating itself and do not count towards stopping."""
    if res.skipped is None:
        state.nonfinite_in_a_row = 0
        return False
    if res.skipped == "fp16 overflow":
        state.overflow_steps += 1
        return False
    state.skipped_steps += 1
    state.nonfinite_in_a_row += 1
    metrics.print(f"step {step}: non-finite {res.skipped}, update skipped ({state.nonfinite_in_a_row} in a row, "
                  f"{state.skipped_steps} in all)")
    return state.nonfinite_in_a_row > cfg.max_consecutive_nonfinite


def trainer_state(state: TrainerState, loader, weighting, sampler, cfg: TrainConfig, total_steps: int) -> dict:
    return {**asdict(state), "total_steps": total_steps, "weighted_loss_mode": cfg.weighted_loss_mode,
            "data": loader.state_dict(), "loss_mode": weighting.state_dict() if weighting else None,
            "valid_sampler": sampler.state_dict() if sampler else None}


def restore_trainer(saved: dict, state: TrainerState, loader, weighting, sampler, cfg: TrainConfig, path: str):
    if saved.get("weighted_loss_mode") != cfg.weighted_loss_mode:
        raise ConfigError(f"weighted_loss_mode: {path} was trained with {saved.get('weighted_loss_mode')!r}, "
                          f"the config says {cfg.weighted_loss_mode!r}")
    for key in asdict(state):
        setattr(state, key, saved[key])
    loader.load_state_dict(saved["data"])
    if weighting is not None:
        weighting.load_state_dict(saved["loss_mode"])
        sampler.load_state_dict(saved["valid_sampler"])
