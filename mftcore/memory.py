"""Where a run's memory goes, measured once after its first optimizer step, and the host allocator
setting that keeps CPU runs' resident memory near what they hold.

memory.json (rank 0, in output_dir, written atomically): weights_gb, gradients_gb, optimizer_state_gb
(bytes of those tensors; under FSDP2 / ZeRO the rank's local shards, as `method` says), activations_gb
(bytes saved for the backward of the first micro-batch, counted by torch.autograd.graph.saved_tensors_hooks
outside checkpointed layers; on CUDA the peak minus the persistent bytes instead), peak_gb (peak allocated
CUDA memory, or on CPU the peak resident set), device and method.

glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which the
mid-sized tensors of a training step come from the heap, which is never returned: on SmolLM2-135M
(packed 512 x 4, fp32, 1 thread, shared 2-core Intel Xeon) LoRA peaked at 4.37 GB RSS against 3.72 GB
for full fine-tuning. Threshold fixed at 128 KiB: 1.65 / 2.67 GB, but 40 tiny-config steps took 1.4x
the CPU time (15x the page faults); at 4 MiB: 1.77 / 2.86 GB and the same CPU time as glibc's default
(10.4 s against 10.2-11.0 s). `fix_host_malloc` sets 4 MiB (mallopt(M_MMAP_THRESHOLD), which also turns
the dynamic raise off), as MALLOC_MMAP_THRESHOLD_=4194304 would from the environment.
MFTCORE_HOST_MALLOC_FIX=0 leaves glibc's default (the dynamic threshold) in place: the "before" of
bench/bench_memory.py. (The figures above are the first hand measurement, a bare step loop; the bench runs
`mftcore train`: bench/results/cpu-intel-r-xeon-r-processor-2cores/memory.json.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

from mftcore.io import atomic_write_json

MEMORY_FILE = "memory.json"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
HOST_MMAP_THRESHOLD = 4 * 2**20  # measured: no CPU cost, most of 128 KiB's memory gain (docstring)


def fix_host_malloc() -> bool:
    """Fix glibc's mmap threshold (see the module docstring); False where there is no glibc, or the
    user set MALLOC_MMAP_THRESHOLD_ (theirs stands), or MFTCORE_HOST_MALLOC_FIX=0 (glibc's default stands)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or os.environ.get("MFTCORE_HOST_MALLOC_FIX", "").strip() == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False


def storage(t):
    """(device, data pointer, bytes) of a tensor's local storage (a DTensor: its local shard), or None for
    a tensor without one of its own (a wrapper subclass, an FSDP parameter whose storage is freed)."""
    t = t.to_local() if hasattr(t, "to_local") else t
    try:
        s = t.untyped_storage()
        return t.device, s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors' local data (a DTensor: its local shard), each storage once."""
    seen, total = set(), 0
    for t in tensors:
        info = storage(t) if t is not None else None
        if info is not None and info[:2] not in seen:
            seen.add(info[:2])
            total += info[2]
    return total


def optimizer_tensors(optimizer):
    for state in getattr(optimizer, "state", {}).values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.ndim > 0:  # a step counter is no state worth counting
                yield v


class SavedBytes:
    """Context manager: the bytes saved for backward inside it, each storage once, parameters excluded."""

    def __init__(self, model):
        self.params = {info[:2] for info in map(storage, model.parameters()) if info is not None}
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        info = storage(t)
        if info is not None and info[:2] not in self.params and info[:2] not in self.seen:
            self.seen.add(info[:2])
            self.bytes += info[2]
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def memory_breakdown(model, optimizer, device: torch.device, *, saved_bytes=None, sharded: str = "") -> dict:
    """The memory.json record (see the module docstring); `sharded`: the engine's name under FSDP/ZeRO."""
    from mftcore.metrics import peak_memory_gb

    gb = 2 ** 30
    params = list(model.parameters())
    weights = tensor_bytes(params)
    # The engines free the gradients at the step's end (zero_grad(set_to_none)); each trained parameter had one.
    grads = tensor_bytes(p.grad if p.grad is not None else p for p in params if p.requires_grad)
    state = tensor_bytes(optimizer_tensors(optimizer))
    peak = peak_memory_gb(device)
    where = f"this rank's local shards ({sharded})" if sharded else "whole tensors"
    if device.type == "cuda":
        activations = max(peak - (weights + grads + state) / gb, 0.0)
        how = "peak allocated CUDA memory minus weights, gradients and optimizer state"
    else:
        activations = (saved_bytes or 0) / gb
        how = "bytes saved for backward in the first micro-batch (saved_tensors_hooks), checkpointed layers' inputs only"
    return {"weights_gb": weights / gb, "gradients_gb": grads / gb, "optimizer_state_gb": state / gb,
            "activations_gb": activations, "peak_gb": peak, "device": str(device),
            "method": f"weights, gradients (one per trained parameter), optimizer state: tensor bytes, {where}; activations: {how}; "
                      f"peak: {'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'peak RSS of the process'}"}


def write_memory(output_dir: str, record: dict) -> str:
    atomic_write_json(os.path.join(output_dir, MEMORY_FILE), record)
    return (f"memory after step 1: weights {record['weights_gb']:.3f} GB, gradients {record['gradients_gb']:.3f} GB, "
            f"optimizer state {record['optimizer_state_gb']:.3f} GB, activations {record['activations_gb']:.3f} GB, "
            f"peak {record['peak_gb']:.3f} GB ({record['device']}; {MEMORY_FILE})")
