"""End-to-end training-step throughput: packed rows + mftcore kernels vs MFTCoder-style padding.

Both modes train the same samples (one whole epoch, the same seeded order) with the same model,
optimizer (AdamW, clipping at 1.0) and case3 loss over the step; only the batch layout and the loss
path differ:
  packed_fused  padding_mode "pack": best-fit-decreasing rows of seq_length, attention kept inside each
                document (PACKED_ATTN), final hidden states -> mftcore's fused linear cross-entropy
                (no logits tensor); the trainer's own batch_loss.
  padded_eager  MFTCoder: one sample per row, dynamic padding to the batch's longest row, sdpa with the
                padding mask, the full [B, L, V] logits from the HF model, upcast, F.cross_entropy.
Throughput is trained (real, non-padding) tokens per second over the timed epoch, after warm-up steps
on the epoch before it. Same data, so the ratio of tokens/s is the ratio of epoch times.

    python bench/bench_train_step.py [--device cpu|cuda] [--quick] [--json PATH]
    mftcore bench train_step [--device cpu|cuda] [--quick] [--json PATH]              # the same

CPU: the tiny model of configs/tiny.json on the sample data, fp32, one thread, best of 3 epochs each.

GPU (bench/gpu_check.py calls gpu_benchmarks()): a Llama-3.2-1B-shaped model built from LLAMA_1B, bf16
weights and AdamW, seq_length 4096, 4 rows (packed) or 4 samples (padded) per step, on synthetic
samples with lognormal lengths (mean ~650 tokens, as bench_packing's). Goal (bench/gates.json, recorded,
not gated in CI): packed >= 2x padded.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import common

ROOT = common.ROOT
# The attention of the packed mode: the Batch's cu_seqlens straight into the varlen kernel (Triton on a
# GPU; per-document SDPA, its reference, on CPU), never an L x L mask.
PACKED_ATTN = "mftcore_varlen"
PADDED_ATTN = "sdpa"
LLAMA_1B = {  # Llama-3.2-1B's shape (random weights: throughput does not depend on their values)
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
    "tie_word_embeddings": True, "vocab_size": 128256}


def gpu_goal() -> float:
    """The packed/padded tokens/s goal of bench/gates.json (recorded by gpu_check.py, not a CI gate)."""
    return common.load_gates()["train_step"]["packed_over_padded_tokens_per_s_gpu"]["min"]


@dataclass(frozen=True)
class Mode:
    name: str
    pack: bool
    attn: str
    fused: bool  # mftcore's fused linear cross-entropy; else eager logits + F.cross_entropy


MODES = (Mode("packed_fused", True, PACKED_ATTN, True), Mode("padded_eager", False, PADDED_ATTN, False))


def build_model(model_config: dict, vocab_size: int, attn: str, dtype, device, seed: int):
    """A randomly initialised HF causal LM from a config dict, created on `device` in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import mftcore.model.attention  # noqa: F401 - registers mftcore_varlen with transformers

    spec = dict(model_config)
    spec.setdefault("vocab_size", vocab_size)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device(device):  # 1B parameters initialised on the GPU: seconds, not a minute on the host
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.to(dtype).train()


def synthetic_samples(n: int, seq_length: int, vocab_size: int, num_tasks: int = 3, seed: int = 0,
                      mean: float = 650.0, sigma: float = 1.0) -> list:
    """Chat-like samples: lognormal lengths in [16, seq_length], the first 30-60% a prompt (no loss)."""
    from mftcore.data import Sample

    rng = np.random.default_rng(seed)
    mu = np.log(mean) - sigma ** 2 / 2
    lengths = np.clip(rng.lognormal(mu, sigma, n), 16, seq_length).astype(np.int64)
    samples = []
    for i, length in enumerate(lengths):
        prompt = int(length * rng.uniform(0.3, 0.6))
        mask = np.r_[np.zeros(prompt, np.uint8), np.ones(length - prompt, np.uint8)]
        samples.append(Sample(rng.integers(0, vocab_size, length), mask, i % num_tasks))
    return samples


def example_samples(config_path: str, cache_dir: str):
    """The sample data of the quick start, through `prepare` (the training split of configs/tiny.json)."""
    from mftcore.config import TrainConfig
    from mftcore.data import load_tasks
    from mftcore.model.load import load_tokenizer

    old = os.getcwd()
    os.chdir(ROOT)  # the config's paths are relative to the checkout
    try:
        cfg = TrainConfig.from_file(config_path, [f"cache_dir={json.dumps(cache_dir)}"])
        tokenizer = load_tokenizer(cfg)
        data = load_tasks(cfg, tokenizer, tokenizer.eos_token_id, progress=False)
    finally:
        os.chdir(old)
    return cfg, data, tokenizer


def eager_loss(model, batch, num_tasks: int, token_scale):
    """MFTCoder's path: the HF model's full logits, upcast, token cross-entropy, scaled per token."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), reduction="none", ignore_index=-100)
    valid = batch.labels.flatten() != -100
    tasks = torch.where(valid, batch.task_ids.flatten(), 0)
    task_sum = torch.zeros(num_tasks, device=ce.device).index_add_(0, tasks, ce.detach())
    return (ce * token_scale).sum(), task_sum


def fused_loss(model, batch, num_tasks: int, token_scale):
    from mftcore.model.loss_model import batch_loss

    out = batch_loss(model, batch, num_tasks, reduction="sum", token_scale=token_scale)
    return out.loss, out.task_loss_sum


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: Mode, model_config: dict, samples, *, vocab_size: int, pad_id: int, seq_length: int,
             batch_size: int, num_tasks: int, dtype=torch.float32, device="cpu", warmup_steps: int = 2,
             lr: float = 1e-4, seed: int = 0) -> dict:
    """Warm-up steps on epoch 0, then one whole timed epoch (epoch 1) of `samples` in this mode."""
    from mftcore.data import StepLoader
    from mftcore.loss import step_token_scales

    model = build_model(model_config, vocab_size, mode.attn, dtype, device, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=True)
    loader = StepLoader(samples, batch_size=batch_size, accumulation=1, pad_id=pad_id, seed=seed,
                        pack=mode.pack, seq_length=seq_length)
    loss_fn = fused_loss if mode.fused else eager_loss
    totals = {"tokens": 0, "positions": 0}
    task_sum = torch.zeros(num_tasks, device=device)
    loss_tokens = torch.zeros(num_tasks, device=device)

    def step(micro, timed: bool):
        nonlocal task_sum, loss_tokens
        if timed:
            totals["tokens"] += sum(b.num_tokens for b in micro)  # on the host, before the copy
            totals["positions"] += sum(b.input_ids.numel() for b in micro)
        micro = [b.to(device) for b in micro]
        scales, counts = step_token_scales(micro, "case3", num_tasks)
        for b, scale in zip(micro, scales):
            loss, tsum = loss_fn(model, b, num_tasks, scale)
            loss.backward()
            if timed:
                task_sum += tsum.float()
        if timed:
            loss_tokens += counts
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = iter(loader)
    for _ in range(min(warmup_steps, loader.steps_per_epoch())):
        step(next(batches)[1], timed=False)
    loader.load_state_dict({"epoch": 1, "step_in_epoch": 0})
    steps = loader.steps_per_epoch()
    batches = iter(loader)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(batches)[1], timed=True)
    synchronize(device)
    seconds = time.perf_counter() - t0
    result = {"mode": mode.name, "attn": mode.attn, "loss": "fused" if mode.fused else "eager", "steps": steps,
              "tokens": totals["tokens"], "positions": totals["positions"], "seconds": seconds,
              "tokens_per_s": totals["tokens"] / seconds,
              "padding_fraction": 1 - totals["tokens"] / totals["positions"],
              "loss_tokens": int(loss_tokens.sum().item()), "task_loss_sum": task_sum.tolist()}
    if torch.device(device).type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    del model, optimizer
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return result


def compare(model_config: dict, samples, *, repeats: int = 1, **kwargs) -> dict:
    """Both modes on the same samples, alternating `repeats` times; the fastest epoch of each counts
    (the machine is shared: the least disturbed run is the closest to the truth)."""
    best, seconds = {}, {m.name: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:
            r = run_mode(mode, model_config, samples, **kwargs)
            seconds[mode.name].append(round(r["seconds"], 3))
            print(f"train_step: {mode.name}: {r['steps']} steps, {r['tokens']} tokens in {r['seconds']:.2f} s",
                  file=sys.stderr, flush=True)  # minutes on a CPU: show it moving
            if mode.name not in best or r["seconds"] < best[mode.name]["seconds"]:
                best[mode.name] = r
    rows = [best[m.name] for m in MODES]
    same = all(rows[0][k] == rows[1][k] for k in ("tokens", "loss_tokens"))  # the same work in both modes
    return {"rows": rows, "speedup": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], "same_tokens": same,
            "samples": len(samples), "repeats": repeats, "epoch_seconds_of_each_repeat": seconds,
            "settings": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in kwargs.items()}}


def table_rows(result: dict) -> list:
    """The columns `mftcore bench train_step` prints."""
    keys = ("mode", "attn", "loss", "steps", "tokens", "padding_fraction", "seconds", "tokens_per_s",
            "peak_memory_gb")
    return [{k: r[k] for k in keys if k in r} for r in result["rows"]]


# ------------------------------------------------------------------------------------------- CPU
def cpu_results(config_path: str | None = None, repeats: int = 3, max_samples: int | None = None,
                threads: int = 1) -> dict:
    """The tiny quick-start model on the sample data, on this CPU, on `threads` torch threads: on the
    shared 2-core machine a second thread waits for a core at every barrier (a padded step of 8x99
    tokens took 0.20 s on one thread and 1.4 s on two while another process trained)."""
    config_path = config_path or os.path.join(ROOT, "configs", "tiny.json")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = cpu_compare(config_path, repeats, max_samples)
    finally:
        torch.set_num_threads(previous)
    result.update({**common.machine_record("cpu"), "data": "examples/data (train split)", "threads": threads})
    return result


def cpu_compare(config_path: str, repeats: int, max_samples: int | None) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        cfg, data, tokenizer = example_samples(config_path, cache)
        samples = list(data.train)[:max_samples]
        result = compare(cfg.model_config, samples, repeats=repeats, vocab_size=len(tokenizer),
                         pad_id=tokenizer.eos_token_id, seq_length=cfg.seq_length,
                         batch_size=cfg.per_device_train_batch_size, num_tasks=len(data.names))
    result["model"] = cfg.model_config
    return result


# ------------------------------------------------------------------------------------------- GPU
def gpu_benchmarks(device="cuda", model_config=None, n_samples: int = 256, seq_length: int = 4096,
                   batch_size: int = 4, dtype=torch.bfloat16, warmup_steps: int = 2) -> dict:
    """The 1B-shaped model in bf16 at seq_length 4096: tokens/s of both modes, and the 2x goal."""
    model_config = model_config or LLAMA_1B
    vocab = model_config["vocab_size"]
    samples = synthetic_samples(n_samples, seq_length, vocab)
    result = compare(model_config, samples, vocab_size=vocab, pad_id=0, seq_length=seq_length,
                     batch_size=batch_size, num_tasks=3, dtype=dtype, device=device, warmup_steps=warmup_steps)
    result["model"] = model_config
    result["goals"] = {f"packed>={gpu_goal():g}x_padded": result["speedup"] >= gpu_goal()}
    return result


# ---------------------------------------------------------------------------------- the script
def run(device: str, quick: bool) -> dict:
    if device == "cuda":
        return {**gpu_benchmarks(n_samples=64 if quick else 256), **common.machine_record("cuda")}
    return cpu_results(repeats=1 if quick else 3, max_samples=64 if quick else None)


def check_gates(result: dict) -> None:
    """None: the GPU goal of gates.json is recorded (result["goals"], gpu_check.py), not a gate yet."""
    return None


def table(result: dict) -> str:
    if result["device"].startswith("cpu-"):
        title = "train step, the tiny model of configs/tiny.json on the sample data, CPU fp32, one thread"
    else:
        title = f"train step, {result['model']['num_hidden_layers']}-layer Llama, bf16, seq_length 4096"
    return "\n".join([title, common.format_table(table_rows(result)),
                      f"packed_fused / padded_eager: {result['speedup']:.2f}x trained tokens/s"])


def main(argv=None) -> int:
    return common.run_script("train_step", run, table, check_gates, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
