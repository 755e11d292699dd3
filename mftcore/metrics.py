"""Logging: metrics.jsonl (one JSON object per logged step), TensorBoard and the other trackers of
report_to (mftcore/trackers.py: every scalar goes through Metrics.write, to all of them), a tqdm
progress bar with ETA, and the throughput figures: tokens/s, achieved TFLOP/s, an MFU estimate and
peak memory.

MFU = model FLOPs per second / the accelerator's peak dense FLOP/s. Model FLOPs of one step
(activation-checkpointing recomputation not counted, so this is MFU, not hardware utilisation):
    tokens * (2 * P_all  +  2 * P_all  +  2 * P_trained)   forward; backward to the inputs (every
                                                          matmul, frozen or not); weight gradients
  + 6 * n_layers * d_attn * sum over documents of length^2   causal attention, fwd + bwd (2 + 4)
P counts the parameters of the matmuls a token goes through: every nn.Linear (4-bit ones by their
logical in x out; LoRA A and B are linears too), the LM head included, the input embedding (a lookup)
excluded; fused MoE expert tensors count top_k / num_experts of their size. Tokens are real
(non-padding) tokens. The peak is `peak_tflops` from the config, else the dense bf16/fp16 tensor-core
peak of the GPU from PEAK_TFLOPS below (no MFU on CPU, or in fp32, without `peak_tflops`).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time

import torch
from tqdm.auto import tqdm

from mftcore.io import METRICS_FILE, AppendFile, atomic_write_text, open_regular, write_guard
from mftcore.trackers import Trackers, scalar_tags, tracker_names

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, TFLOP/s.
PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("A100", 312.0),
               ("A800", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("L4", 121.0), ("V100", 125.0)]


class Metrics:
    """Rank 0 writes; other ranks get a silent instance. TensorBoard tags follow MFTCoder
    (`{task}_loss/train`, `{task}_loss/valid`) so existing dashboards keep working."""

    def __init__(self, output_dir: str, tb_dir: str | None, total_steps: int, initial_step: int = 0,
                 enabled: bool = True, report_to="tensorboard", config: dict | None = None):
        self.enabled = enabled
        self.bar = self.tb = self.trackers = None
        if not enabled:
            return
        path = os.path.join(output_dir, METRICS_FILE)
        # A fresh run starts a fresh file; a resumed one drops what the stopped run logged after its
        # checkpoint (those steps run again) and appends; TensorBoard purges the same steps.
        if initial_step:
            keep_records_up_to(path, initial_step)
        self.jsonl = AppendFile(path, truncate=not initial_step)
        self.tb_dir = tb_dir or os.path.join(output_dir, "tensorboard")
        if "tensorboard" in tracker_names(report_to):
            from torch.utils.tensorboard import SummaryWriter

            with write_guard(self.tb_dir):
                self.tb = SummaryWriter(self.tb_dir, purge_step=initial_step + 1 if initial_step else None)
                if config is not None and not initial_step:  # the run's config, once (TensorBoard's text tab)
                    self.tb.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")
        self.trackers = Trackers(report_to, output_dir, config or {}, resumed=bool(initial_step), say=self.print)
        self.started = time.perf_counter()
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def advance(self, postfix: dict | None = None) -> None:
        """One more step on the progress bar; `postfix` (the logged values) on logging steps."""
        if self.bar is not None:
            self.bar.update(1)
            if postfix:  # after the update, refreshed: the line shows this step's count with its own values
                self.bar.set_postfix(postfix)

    def write(self, step: int, split: str, scalars: dict, task_loss: dict, task_values: dict | None = None) -> None:
        """One JSONL record {"step", "split", **scalars, "task_loss": {task: loss}, **task_values} and the
        TB scalars; task_values maps e.g. "task_tokens" to {task: value}, logged as `{task}_tokens/{split}`."""
        if not self.enabled:
            return
        task_values = task_values or {}
        record = {"step": step, "split": split, **scalars, "task_loss": task_loss, **task_values}
        self.jsonl.append(json.dumps(record) + "\n")  # whole or not at all, even on a full disk
        tags = scalar_tags(split, scalars, task_loss, task_values)  # None (no MFU on CPU) left out
        if self.tb is not None:
            with write_guard(self.tb_dir):  # TensorBoard's writer thread re-raises its write errors here
                for tag, value in tags.items():
                    self.tb.add_scalar(tag, value, step)
        self.trackers.log(step, tags)  # never raises: a failing tracker is reported once and dropped

    def runtime(self) -> float:
        """Seconds since the loop's logging started (this process: a resumed run counts from its resume)."""
        return time.perf_counter() - self.started if self.enabled else 0.0

    def print(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def abort(self) -> None:
        """The run is failing: end the progress bar's line (so the error is a line of its own), close the
        files; errors of their own (a full disk) are not allowed to hide the one being raised."""
        if self.enabled and self.bar is not None:
            with contextlib.suppress(Exception):
                self.bar.close()
            self.jsonl.close()
            with contextlib.suppress(Exception):
                if self.tb is not None:
                    self.tb.close()
            self.trackers.close()
            self.enabled = False

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            if self.tb is not None:
                with write_guard(self.tb_dir):
                    self.tb.close()
            self.trackers.close()


class Window:
    """What the steps since the last log line add up to: tokens, model FLOPs, per-task loss sums and
    token counts (kept on the device: nothing is read back before the log line), skip codes."""

    def __init__(self, num_tasks: int, peak: float | None):
        self.num_tasks, self.peak = num_tasks, peak
        self.reset()

    def reset(self) -> None:
        self.tokens, self.flops, self.t0 = 0, 0.0, time.perf_counter()
        self.task_loss_sum = self.task_token_count = None
        self.loss_sum = self.loss_steps = None  # the finite step losses, for the logged window mean
        self.skips = []  # (step, skip code), the code an int or a device tensor

    def add_step(self, step: int, tokens: int, flops: float, res) -> None:
        self.tokens += tokens
        self.flops += flops
        sums, counts = res.task_loss_sum.float(), res.task_token_count.float()
        self.task_loss_sum = sums if self.task_loss_sum is None else self.task_loss_sum + sums
        self.task_token_count = counts if self.task_token_count is None else self.task_token_count + counts
        self.skips.append((step, res.skip))
        loss = torch.as_tensor(res.loss).detach().float()
        finite = torch.isfinite(loss)  # a skipped step's NaN stays out of the mean (HF's logging_nan_inf_filter)
        kept = torch.where(finite, loss, torch.zeros_like(loss))
        self.loss_sum = kept if self.loss_sum is None else self.loss_sum + kept
        self.loss_steps = finite.int() if self.loss_steps is None else self.loss_steps + finite.int()

    def mean_loss(self):
        """The mean step loss over the window's finite steps (the logged `loss`, as HF Trainer and axolotl
        log it); None when no step of the window had a finite loss."""
        if self.loss_sum is None:
            return None
        total, steps = float(self.loss_sum), int(self.loss_steps)
        return total / steps if steps else None

    def take_skips(self) -> list:
        """[(step, code)] of the steps since the last call, read to the host at once."""
        skips, self.skips = self.skips, []
        codes = torch.stack([torch.as_tensor(c) for _, c in skips]).tolist() if skips else []
        return [(step, int(code)) for (step, _), code in zip(skips, codes)]

    def rates(self) -> dict:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        flops = self.flops / elapsed
        return {"tokens_per_s": self.tokens / elapsed, "tflops": flops / 1e12,
                "mfu": flops / self.peak if self.peak else None}

    def task_counts(self) -> list:
        return [0.0] * self.num_tasks if self.task_token_count is None else self.task_token_count.tolist()

    def task_losses(self) -> list:
        if self.task_loss_sum is None:
            return [None] * self.num_tasks
        return [float(s / c) if c > 0 else None
                for s, c in zip(self.task_loss_sum.tolist(), self.task_token_count.tolist())]


def keep_records_up_to(path: str, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the records after `step`. A last line without its
    newline is what a writer killed mid-append (or an older version on a full disk) left: dropped, as is
    any line that is not a JSON record (it could only be damage), with a note."""
    if not os.path.isfile(path):
        return
    with open_regular(path, what="metrics file") as f:
        raw = f.read()
    kept, damaged = [], 0
    for line in raw.split(b"\n")[:-1] if raw.endswith(b"\n") else raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError, RecursionError):
            damaged += 1
            continue
        if not isinstance(record.get("step", 0), (int, float)) or record.get("step", 0) <= step:
            kept.append(line.decode("utf-8") + "\n")
    if damaged:
        print(f"mftcore: note: {path}: dropped {damaged} damaged line(s) (a write cut short)", file=sys.stderr)
    atomic_write_text(path, "".join(kept))


# --- FLOPs, MFU, memory ------------------------------------------------------------------------

def matmul_params(model) -> tuple:
    """(P_all, P_trained) of the module docstring: parameters of the matmuls a token goes through."""
    embedding = model.get_input_embeddings()
    config = getattr(model, "config", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    active = (getattr(config, "num_experts_per_tok", None) or 1) / experts if experts else 1.0
    total = trained = 0.0
    for module in model.modules():
        if module is embedding:
            continue
        if isinstance(module, torch.nn.Linear):
            n = module.in_features * module.out_features
            total += n
            trained += n if module.weight.requires_grad else 0
            continue
        for p in module.parameters(recurse=False):
            if p.ndim == 3:  # fused experts [E, out, in]: only top_k of E run per token
                total += p.numel() * active
                trained += p.numel() * active if p.requires_grad else 0
    return total, trained


def attention_width(model) -> tuple:
    """(n_layers, query heads x head dim) from the HF config."""
    c = model.config
    heads = getattr(c, "num_attention_heads", 0)
    head_dim = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else 0)
    return getattr(c, "num_hidden_layers", 0), heads * head_dim


def step_flops(params: tuple, attn: tuple, tokens: int, sq_lengths: int) -> float:
    p_all, p_trained = params
    n_layers, d_attn = attn
    return tokens * (4 * p_all + 2 * p_trained) + 6 * n_layers * d_attn * sq_lengths


def peak_flops(device: torch.device, dtype: torch.dtype, peak_tflops=None):
    """The FLOP/s the MFU is measured against, or None when it is not known."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory; on CPU the peak resident set size of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
