"""The training loop: `build_run` sets everything up, then one visible loop of optimizer steps reads
fetch -> step -> weights -> log -> evaluate -> save -> stop.

    mftcore train configs/tiny.json [key=value ...]

Everything a step depends on (weights, optimizer, scheduler, scaler, RNG, data position, the dynamic
weighting and validation-sampler positions, best/stall counters) is in each checkpoint, so a run
resumed from checkpoint-N ends bitwise equal to one that never stopped (on CPU; tested). Values that
live on the device (losses, gradient norms, whether an update was skipped) are read back on logging
steps only, so the loop never waits for a GPU in between; skipped updates are counted there too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from mftcore import checkpoint, parallel
from mftcore.codeeval.training import TrainingBenchmarks, benchmark_records, check_benchmarks
from mftcore.commands.report import read_metrics, summary_lines, write_report, write_run_info
from mftcore.config import TrainConfig
from mftcore.data import StepLoader, load_tasks, report_lines
from mftcore.data.loader import Prefetcher
from mftcore.data.plan import plan_lines
from mftcore.data.sampling import build_mixture
from mftcore.errors import ConfigError, TrainingError, TrainingInterrupted
from mftcore.evaluate import ValidationSampler, evaluate, evaluate_batches
from mftcore.io import remove_leftovers
from mftcore.loss import loss_mode, step_token_scales
from mftcore.memory import SavedBytes, fix_host_malloc, memory_breakdown, write_memory
from mftcore.metrics import Metrics, Window, attention_width, matmul_params, peak_flops, peak_memory_gb, step_flops
from mftcore.model.build import build_model, compute_dtype
from mftcore.model.chat_template import set_stop_tokens, set_training_template
from mftcore.model.compile import compiled_loss
from mftcore.model.decoder import causal_lm
from mftcore.model.load import check_model_config, check_vocabulary, load_tokenizer
from mftcore.model.loss_model import LossModel
from mftcore.model.moe import moe_spec
from mftcore.optim import build_optimizer, build_scheduler
from mftcore.outputs import RunLock, check_train_paths
from mftcore.parallel.comm import sum_numbers, sum_over_ranks
from mftcore.parallel.engine import SKIP_REASONS
from mftcore.parallel.tuning import run_shapes, share_kernel_tuning
from mftcore.trackers import check_trackers
from mftcore.weighting import build_weighting


def train(cfg: TrainConfig) -> str:
    """Run training to the end; returns the directory of the final model (or adapter). Under torchrun
    every rank runs this; the engine is cfg.distributed_type (mftcore/parallel/)."""
    fix_host_malloc()  # before the model's tensors exist: see mftcore/memory.py
    env = parallel.setup(cfg)
    try:
        check_train_paths(cfg)
        with RunLock(cfg.output_dir, enabled=env.rank == 0):  # before anything in output_dir is touched
            run = build_run(cfg, env)
            try:
                return train_loop(run)
            except BaseException:
                run.metrics.abort()  # the progress bar's line ended, so the error prints as a line of its own
                raise
    finally:
        parallel.teardown(env)


def train_loop(run: "Run") -> str:
    cfg, state = run.cfg, run.state
    if cfg.eval_at_start and state.step == 0:  # before vs after in one run; a resumed run has its step-0 record
        evaluate_at_start(run)
    window = Window(len(run.names), run.peak * run.env.world_size if run.peak else None)
    with StopRequest() as stop, Prefetcher(run.loader.steps(), run.env.device) as steps:
        while state.step < run.total_steps and not state.early_stopped:
            batch = next(steps)  # fetch
            lr = run.scheduler.get_last_lr()[0]
            measuring = state.step == 0 and run.env.device.type == "cpu"  # memory.json: measured on step 1 only
            with SavedBytes(run.engine.module) if measuring else contextlib.nullcontext() as saved:
                res = train_step(run.engine, batch.batches, run.scheduler, cfg, len(run.names), run.weights,  # step
                                 autocast=run.autocast, moe=run.moe)
            if state.step == 0:
                report_memory(run, saved)
            state.step, run.position = state.step + 1, batch.position
            step = state.step
            # All ranks' tokens, and whether any rank has had a SIGTERM (all stop after the same step).
            tokens, sq_lengths, stopping = sum_numbers([batch.tokens, batch.sq_lengths, stop.requested])
            window.add_step(step, tokens, step_flops(run.flop_params, run.attn, tokens, sq_lengths), res)
            if run.weighting is not None and step % run.weighting.interval == 0:  # weights (logged: the next step's)
                update_weights(run, step)
            log_now = step % cfg.log_interval == 0 or step == run.total_steps
            if log_now:  # log
                run.diverged |= count_skips(run, window.take_skips())
                log_train(run, step, epochs_done(batch.position), lr, res, window)
            run.metrics.advance({"loss": f"{float(res.loss):.4f}", "lr": f"{lr:.2e}"} if log_now else None)
            improved = False
            if cfg.evaluation_steps and run.data.valid and (step % cfg.evaluation_steps == 0
                                                            or step == run.total_steps):
                improved = log_evaluation(run, step, run.evaluate_valid())  # evaluate
            due = run.benchmarks.due(step, run.total_steps) if run.benchmarks is not None else []
            if due:  # evaluate: the code benchmarks, each on its own schedule
                improved |= log_benchmarks(run, step, run.benchmarks.evaluate(step, due))
            epoch_end = run.loader.epoch_ended(run.position)
            if should_checkpoint(cfg, step, run.total_steps, epoch_end=epoch_end, improved=improved,
                                 stopping=bool(stopping) or state.early_stopped or run.diverged):
                run.diverged |= count_skips(run, window.take_skips())  # the checkpoint counts every step
                path = save(run, step)  # save
                stop_if_asked(run, step, path, stopping=(stop.requested or signal.SIGTERM) if stopping else 0)  # stop
    return finish(run)


# --- one optimizer step ----------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: torch.Tensor  # the step's loss (its mode's, over all micro-batches and ranks), MoE aux loss excluded
    task_loss_sum: torch.Tensor  # [K] summed token cross-entropy
    task_token_count: torch.Tensor  # [K] loss tokens
    grad_norm: torch.Tensor
    aux_loss: Optional[torch.Tensor]  # the MoE load-balancing term (already times its coefficient)
    skip: object  # index of SKIP_REASONS (0: the update was applied); an int or a device tensor


def train_step(engine, batches, scheduler, cfg: TrainConfig, num_tasks: int, weights, *,
               autocast=contextlib.nullcontext, moe=None) -> StepResult:
    """One optimizer step over its micro-batches, normalised over all of them (and all ranks); a
    non-finite loss or gradient leaves the weights untouched (the schedule still advances, so lr stays
    a function of step). `engine`: a mftcore.parallel Engine around the model (any engine)."""
    scales, counts = step_token_scales(batches, loss_mode(cfg.weighted_loss_mode).base, num_tasks, weights)
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
        loss, task_sum = sum_over_ranks(loss, task_sum)
    else:
        loss, task_sum, aux_total = sum_over_ranks(loss, task_sum, aux_total)
    grad_norm, skip = engine.step(cfg.max_grad_norm, loss if aux_total is None else loss + aux_total)
    with warnings.catch_warnings():  # a skipped update still advances the schedule, on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()
    return StepResult(loss, task_sum, counts, grad_norm, aux_total, skip)


# --- the run: everything the loop touches ----------------------------------------------------------

@dataclass
class TrainerState:
    """The loop's own counters and records; saved in trainer_state.json with the data and weighting positions."""
    step: int = 0
    best_loss: Optional[float] = None
    best_step: Optional[int] = None
    stall: int = 0
    early_stopped: bool = False
    skipped_steps: int = 0
    overflow_steps: int = 0
    nonfinite_in_a_row: int = 0
    skips: list = field(default_factory=list)  # [step, reason] of every update skipped for a non-finite value
    evaluations: list = field(default_factory=list)  # [step, validation loss] of every evaluation
    best_metric: Optional[float] = None  # the best value of a benchmark metric_for_best (then it sets best_step)
    benchmark_evaluations: list = field(default_factory=list)  # [step, name, {pass@k: value}] of eval_benchmarks


@dataclass
class Run:
    cfg: TrainConfig
    env: parallel.Dist
    names: list  # task names, in data_paths order
    tokenizer: object
    data: object  # mftcore.data.TaskData
    engine: parallel.Engine
    scheduler: object
    loader: StepLoader
    total_steps: int
    autocast: Callable
    moe: object  # MoeSpec or None
    weighting: object  # the dynamic weighting of the loss mode, or None
    sampler: Optional[ValidationSampler]  # validation batches for the dynamic weighting
    evaluate_valid: Callable  # () -> EvalResult over the whole validation set
    metrics: Metrics
    weights: Optional[torch.Tensor]  # [K] task weights on the device (static, or the dynamic ones of now)
    flop_params: tuple
    attn: tuple
    peak: Optional[float]
    pad_id: int
    state: TrainerState = field(default_factory=TrainerState)
    position: dict = field(default_factory=dict)  # the loader position after the last step run
    diverged: bool = False  # more than max_consecutive_nonfinite skipped updates in a row
    benchmarks: Optional[TrainingBenchmarks] = None  # eval_benchmarks (mftcore/codeeval/training.py)

    def upload_weights(self) -> None:
        """The dynamic weights to the device, once per change (a host-to-device copy waits for the GPU)."""
        self.weights = torch.tensor(self.weighting.weights(), device=self.env.device)


def build_run(cfg: TrainConfig, env: parallel.Dist) -> Run:
    """Tokenizer, data, model, engine, optimizer, schedule, loader, weighting and metrics; resumed from
    the checkpoint resolve_resume picks, if any."""
    device = env.device
    check_benchmarks(cfg)  # their config errors before anything loads
    check_trackers(cfg.report_to)  # a tracker's library missing: one line now, not after the model loaded
    if cfg.num_threads:  # on a shared 2-core machine 2 threads ran 4-9x slower than 1 (issue 19)
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    resume_from = checkpoint.resolve_resume(cfg, env.rank)
    if env.rank == 0:
        remove_leftovers(cfg.output_dir)

    tokenizer = load_tokenizer(cfg)
    check_model_config(cfg, len(tokenizer))  # before the data: a bad model_config fails in seconds
    pad_id = tokenizer.eos_token_id  # MFTCoder pads with EOS; padding never reaches the loss
    data = load_tasks(cfg, tokenizer, tokenizer.eos_token_id, local_rank=env.local_rank)
    parallel.join(env, cfg.init_timeout_seconds)  # after the data: tokenizing forks, which must precede threads
    K, mode = len(data.names), loss_mode(cfg.weighted_loss_mode)
    if mode.needs_valid and not data.valid:
        raise ConfigError(f"data_split: weighted_loss_mode {cfg.weighted_loss_mode!r} needs validation data")

    engine_class = parallel.ENGINES[env.engine]
    dtype = compute_dtype(cfg, device)
    own_precision = not engine_class.casts_itself  # autocast over fp32 weights, and a loss scaler for fp16
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype,
                                 enabled=own_precision and dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 and own_precision else None
    model = build_model(cfg, len(tokenizer), device, place=not engine_class.shards_model)
    check_vocabulary(model, tokenizer, data.report)
    lm = causal_lm(model)
    moe = moe_spec(lm.config, cfg.router_aux_loss_coef)
    n_params = sum(p.numel() for p in model.parameters())  # before sharding, which hides sizes from ZeRO-3
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flop_params, attn = matmul_params(lm), attention_width(lm)
    shapes = run_shapes(cfg, lm, dtype)  # before wrapping: an engine may shard the LM head
    loss_model = LossModel(model, K, compiled_loss()) if cfg.torch_compile else LossModel(model, K)
    engine = parallel.wrap(loss_model, cfg, env, dtype=dtype, scaler=scaler, moe=moe,
                           make_optimizer=functools.partial(build_optimizer, cfg=cfg))
    share_kernel_tuning(env, shapes)  # many ranks: rank 0 times the kernels' candidates for all
    loader = StepLoader(data.train, batch_size=cfg.per_device_train_batch_size,
                        accumulation=cfg.gradient_accumulation_steps, pad_id=pad_id, seed=cfg.seed, rank=env.rank,
                        world_size=env.world_size, pack=cfg.padding_mode == "pack", seq_length=cfg.seq_length,
                        mixture=build_mixture(cfg, data.train, K))
    saved_state = checkpoint.read_state(resume_from) if resume_from else None
    if saved_state is not None:  # the position first: a resume with another step size plans its own steps
        checkpoint.check_same_model(resume_from, cfg.to_dict())
        loader.load_state_dict(saved_state["data"])
    total_steps = cfg.max_train_steps or ((saved_state or {}).get("step", 0)
                                          + loader.remaining_steps(cfg.num_train_epochs))
    scheduler = build_scheduler(engine.optimizer, cfg, total_steps)
    weighting = build_weighting(cfg, K)
    sampler = ValidationSampler(data.valid, cfg.per_device_eval_batch_size, pad_id) if weighting else None
    evaluate_valid = functools.partial(evaluate, engine.module, data.valid, batch_size=cfg.per_device_eval_batch_size,
                                       pad_id=pad_id, num_tasks=K, device=device, autocast=autocast, rank=env.rank,
                                       world_size=env.world_size, progress=True)
    run = Run(cfg, env, data.names, tokenizer, data, engine, scheduler, loader, total_steps, autocast, moe,
              weighting, sampler, evaluate_valid, metrics=None,
              weights=None if cfg.task_weights is None else torch.tensor(cfg.task_weights, device=device),
              flop_params=flop_params, attn=attn, peak=peak_flops(device, dtype, cfg.peak_tflops), pad_id=pad_id,
              position=loader.state_dict())
    if cfg.eval_benchmarks:
        run.benchmarks = TrainingBenchmarks(cfg, tokenizer, engine, env, autocast)
    saved = resume(run, resume_from) if resume_from else None
    if weighting is not None:
        run.upload_weights()

    run.metrics = Metrics(cfg.output_dir, cfg.tb_dir, total_steps, initial_step=run.state.step,
                          enabled=env.rank == 0, report_to=cfg.report_to, config=cfg.to_dict())
    on = f"{device}" if env.world_size == 1 else f"{env.world_size} ranks ({env.engine}, {device.type})"
    startup = [*report_lines(data, cfg),
               f"model: {n_params / 1e6:.2f}M parameters, {n_trained / 1e6:.2f}M trained "
               f"({cfg.peft_type or 'full'}, {str(dtype).removeprefix('torch.')}); {total_steps} steps on {on}",
               *plan_lines(cfg, loader, total_steps, len(data.valid)),
               f"CPU threads: {torch.get_num_threads()} per process "
               f"({'num_threads' if cfg.num_threads else 'torch default; set num_threads to change'})"]
    for line in startup:
        run.metrics.print(line)
    if env.rank == 0:  # what `mftcore report` shows of the run besides its curves
        write_run_info(cfg.output_dir, cfg.to_dict(), data.names, startup, total_steps)
    if saved is not None:
        report_resume(run, resume_from, saved)
    elif mode.needs_initial:  # e.g. CoBa's loss ratios are relative to the losses before training
        weighting.set_initial(evaluate_valid().task_losses())
    return run


def resume(run: Run, path: str) -> dict:
    """Load the checkpoint into the run; the RNG states last, once nothing else will draw before step 1."""
    saved = checkpoint.load_checkpoint(path, run.engine, run.scheduler)
    if loss_mode(saved.get("weighted_loss_mode", "case3")).name != loss_mode(run.cfg.weighted_loss_mode).name:
        raise ConfigError(f"weighted_loss_mode: {path} was trained with {saved.get('weighted_loss_mode')!r}, "
                          f"the config says {run.cfg.weighted_loss_mode!r}")
    defaults = TrainerState()
    for key in asdict(defaults):
        setattr(run.state, key, saved.get(key, getattr(defaults, key)))
    with checkpoint.load_errors(path):  # the loop's states are read from JSON: one line if they do not fit
        run.loader.load_state_dict(saved["data"])
        run.position = run.loader.state_dict()
        if run.weighting is not None:
            run.weighting.load_state_dict(saved["loss_mode"])
            run.sampler.load_state_dict(saved["valid_sampler"])
    checkpoint.restore_checkpoint_rng(path, run.env.rank)
    return saved


def report_resume(run: Run, path: str, saved: dict) -> None:
    run.metrics.print(f"resumed from {path} at step {run.state.step}")
    if saved.get("world_size", 1) != run.env.world_size:
        run.metrics.print(f"note: the checkpoint was saved by {saved.get('world_size', 1)} ranks, this run has "
                          f"{run.env.world_size}: dropout draws from other random streams than that run's would have")
    if saved.get("total_steps") != run.total_steps:
        run.metrics.print(f"note: {run.total_steps} steps in all, the checkpoint's run planned "
                          f"{saved.get('total_steps')}: the learning-rate schedule from here differs from that run's")


# --- what the loop calls ---------------------------------------------------------------------------

def per_task(names, values) -> dict:
    return {n: v for n, v in zip(names, values) if v is not None}


def log_train(run: Run, step: int, epoch: float, lr: float, res: StepResult, window: Window) -> None:
    """One train record: this step's loss (`step_loss`), lr and gradient norm; the mean loss (`loss`, as
    HF Trainer logs it), loss and tokens per task, throughput and MFU over the steps since the last
    record; the dynamic task weights; `epoch` fractional (epochs done, as HF logs it)."""
    step_loss, mean_loss = float(res.loss), window.mean_loss()
    scalars = {"loss": step_loss if mean_loss is None else mean_loss, "step_loss": step_loss,
               "lr": lr, "grad_norm": float(res.grad_norm), "epoch": epoch,
               **window.rates(), "memory_gb": peak_memory_gb(run.env.device),
               "skipped_steps": run.state.skipped_steps}
    if res.aux_loss is not None:
        scalars["aux_loss"] = float(res.aux_loss)
    extra = {"task_tokens": per_task(run.names, window.task_counts())}
    for key, value in (run.weighting.log_values() if run.weighting is not None else {}).items():
        if isinstance(value, list):
            extra[key] = per_task(run.names, value)
        else:
            scalars[key] = value
    run.metrics.write(step, "train", scalars, per_task(run.names, window.task_losses()), extra)
    window.reset()


def epochs_done(position: dict) -> float:
    """Epochs done after a step, fractional (2.5: half of the third epoch), from the loader's position."""
    units = position.get("units") or 1
    return round(position["epoch"] + min(position.get("consumed", 0), units) / units, 4)


def count_skips(run: Run, skips: list) -> bool:
    """Count the skipped updates of [(step, code)]; True when more than max_consecutive_nonfinite were
    skipped in a row. fp16 overflows are the loss scaler calibrating itself and do not count."""
    state, diverged = run.state, False
    for step, code in skips:
        reason = SKIP_REASONS[code]
        if reason is None:
            state.nonfinite_in_a_row = 0
            continue
        if reason == "fp16 overflow":
            state.overflow_steps += 1
            continue
        state.skipped_steps += 1
        state.nonfinite_in_a_row += 1
        state.skips.append([step, reason])
        run.metrics.print(f"step {step}: non-finite {reason}, update skipped ({state.nonfinite_in_a_row} in a row, "
                          f"{state.skipped_steps} in all)")
        diverged |= state.nonfinite_in_a_row > run.cfg.max_consecutive_nonfinite
    return diverged


def update_weights(run: Run, step: int) -> None:
    """Measure the validation losses on a few batches and let the dynamic weighting update the weights."""
    w = run.weighting
    measured = evaluate_batches(run.engine.module, run.sampler.next_batches(w.samples_per_update), len(run.names),
                                run.env.device, run.autocast, pad_id=run.pad_id, rank=run.env.rank,
                                world_size=run.env.world_size)
    w.observe(step, measured.task_losses())
    run.upload_weights()


def log_evaluation(run: Run, step: int, result) -> bool:
    """Log a validation result, record it, and track the best loss and early stopping; True on a new best."""
    cfg, state = run.cfg, run.state
    vloss = result.combined_loss(cfg.task_weights)
    state.evaluations.append([step, vloss])
    improved = state.best_loss is None or vloss < state.best_loss
    if run.benchmarks is not None and run.benchmarks.metric is not None:  # a benchmark metric decides instead
        state.best_loss = vloss if improved else state.best_loss
        improved = False
    elif improved:
        state.best_loss, state.best_step, state.stall = vloss, step, 0
    else:
        state.stall += 1
        state.early_stopped = cfg.early_stopping and state.stall >= cfg.early_stopping_stall_num
    write_valid_record(run, step, result, vloss)
    if state.early_stopped:
        run.metrics.print(f"early stopping at step {step}: no better validation loss in {state.stall} evaluations "
                          f"(best {state.best_loss:.4f} at step {state.best_step})")
    return improved


def write_valid_record(run: Run, step: int, result, vloss: float) -> None:
    run.metrics.write(step, "valid", {"loss": vloss, "accuracy": result.accuracy()},
                      per_task(run.names, result.task_losses()),
                      {"task_accuracy": per_task(run.names, result.task_accuracy()),
                       "task_tokens": per_task(run.names, result.task_token_count.tolist())})


def report_memory(run: Run, saved) -> None:
    """memory.json after the first optimizer step (mftcore/memory.py), and its line."""
    sharded = run.env.engine if run.env.engine in ("fsdp", "deepspeed") else ""
    record = memory_breakdown(run.engine.module, run.engine.optimizer, run.env.device,
                              saved_bytes=saved.bytes if saved is not None else None, sharded=sharded)
    if run.env.rank == 0:
        run.metrics.print(write_memory(run.cfg.output_dir, record))


def evaluate_at_start(run: Run) -> None:
    """eval_at_start: the validation loss of the model before training, logged as step 0. It is not an
    evaluation of the run (no best checkpoint, no early-stopping count: there is no checkpoint-0), and the
    RNG states are restored after it, so the training that follows is bitwise the same as without it."""
    if not run.data.valid:
        run.metrics.print("eval_at_start: no validation data (data_split gives none), nothing to evaluate")
        return
    device = run.env.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        result = run.evaluate_valid()
    vloss = result.combined_loss(run.cfg.task_weights)
    write_valid_record(run, 0, result, vloss)
    run.metrics.print(f"step 0 (before training): validation loss {vloss:.4f}")


def log_benchmarks(run: Run, step: int, results: dict) -> bool:
    """Log pass@k of each benchmark (and per task tag), record them, and when metric_for_best is one of
    them track the best value and early stopping; True on a new best."""
    cfg, state, metric = run.cfg, run.state, run.benchmarks.metric
    for name, result in results.items():
        scalars, per_tag = benchmark_records(result)
        state.benchmark_evaluations.append([step, name, result.metrics()])
        run.metrics.write(step, name, scalars, {}, per_tag)
        run.metrics.print(f"step {step}: {name} " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics().items()))
    if metric is None or metric[0] not in results:
        return False
    value = results[metric[0]].metrics()[metric[1]]
    improved = state.best_metric is None or value > state.best_metric
    if improved:
        state.best_metric, state.best_step, state.stall = value, step, 0
    else:
        state.stall += 1
        state.early_stopped = cfg.early_stopping and state.stall >= cfg.early_stopping_stall_num
    if state.early_stopped:
        run.metrics.print(f"early stopping at step {step}: no better {cfg.metric_for_best} in {state.stall} "
                          f"evaluations (best {state.best_metric:.4f} at step {state.best_step})")
    return improved


def should_checkpoint(cfg: TrainConfig, step: int, total_steps: int, *, epoch_end: bool, improved: bool,
                      stopping: bool) -> bool:
    """Every checkpointing_steps, at an epoch's end (epoch_checkpointing), at the last step, at a new best
    validation loss, and when the run stops early (early stopping, SIGTERM, too many non-finite steps)."""
    periodic = bool(cfg.checkpointing_steps) and step % cfg.checkpointing_steps == 0
    return periodic or (cfg.epoch_checkpointing and epoch_end) or step == total_steps or improved or stopping


def save(run: Run, step: int) -> str:
    state = run.state
    trainer = {**asdict(state), "total_steps": run.total_steps, "weighted_loss_mode": run.cfg.weighted_loss_mode,
               "data": run.position, "loss_mode": run.weighting.state_dict() if run.weighting else None,
               "valid_sampler": run.sampler.state_dict() if run.sampler else None}
    path = checkpoint.save_checkpoint(run.cfg.output_dir, step, run.engine, run.scheduler, trainer,
                                      config=run.cfg.to_dict())
    if run.env.rank == 0:
        checkpoint.prune_checkpoints(run.cfg.output_dir, run.cfg.saving_limit, {state.best_step, step})
    return path


def stop_if_asked(run: Run, step: int, path: str, *, stopping: bool) -> None:
    """Too many non-finite steps in a row, or a SIGTERM: the checkpoint is saved; end the run."""
    if run.diverged:
        run.metrics.close()
        last = run.state.skips[-1][1] if run.state.skips else "value"
        raise TrainingError(
            f"{run.state.nonfinite_in_a_row} steps in a row had a non-finite {last} (the last at step {step}; "
            f"max_consecutive_nonfinite={run.cfg.max_consecutive_nonfinite}); stopped with {path}. "
            f"Lower learning_rate or check the data, then resume")
    if stopping:
        run.metrics.close()
        signum = int(stopping)  # this rank's signal (another rank's, SIGTERM, when only that one had one)
        raise TrainingInterrupted(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved to "
                                  f"{path} (resume with resume_from_checkpoint=auto)", signum)


def finish(run: Run) -> str:
    """final/: the model with a chat template that renders the training string; report.html and the summary."""
    set_training_template(run.tokenizer, run.cfg.chat_template, run.cfg.role_markers)
    set_stop_tokens(causal_lm(run.engine.model), run.tokenizer, run.cfg.chat_template)
    final = checkpoint.save_final(run.cfg.output_dir, run.engine, run.tokenizer, run.cfg.to_dict())
    run.metrics.close()
    if run.env.rank == 0:
        print_summary(run, final)
    return final


def print_summary(run: Run, final: str) -> None:
    """report.html (a failure to write it is a warning: the run itself is done), then the end-of-run summary:
    steps, epochs, tokens, runtime, final losses per task, the best checkpoint, where final/ and the report are."""
    output_dir, report = run.cfg.output_dir, None
    try:
        report = write_report(output_dir)
    except Exception as e:  # the model is saved; a report that cannot be drawn must not fail the run
        print(f"mftcore: warning: {os.path.join(output_dir, 'report.html')} not written ({type(e).__name__}: "
              f"{' '.join(str(e).split())}); `mftcore report {output_dir}` retries", file=sys.stderr)
    state, cfg = run.state, run.cfg
    best = None
    if state.best_step is not None:
        best_path = os.path.join(output_dir, f"checkpoint-{state.best_step}")
        best = (f"{best_path} (best {cfg.metric_for_best} {state.best_metric:.4f} at step {state.best_step})"
                if state.best_metric is not None else
                f"{best_path} (best validation loss {state.best_loss:.4f} at step {state.best_step})")
    try:
        records = read_metrics(output_dir)
    except Exception:  # already reported above, as the report's failure
        records = []
    for line in summary_lines(records, steps=state.step, total_steps=run.total_steps,
                              runtime_s=run.metrics.runtime(), best=best, final=final, report=report):
        print(line)


class StopRequest:
    """SIGTERM or Ctrl-C (SIGINT) sets `requested` to the signal's number; the loop finishes the current
    step, saves a checkpoint and stops. A second Ctrl-C stops at once (the last checkpoint stays)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested, self.previous = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        if signum == signal.SIGINT:
            print("\nmftcore: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again stops now)",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, previous in self.previous.items():
            signal.signal(s, previous)
