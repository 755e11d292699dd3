"""Collectives over the ranks of a run; every one is a no-op in a single process."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

_HOST_GROUP = {}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(*tensors: torch.Tensor) -> tuple:
    """The tensors summed over all ranks, in one all_reduce on their device (no host synchronisation)."""
    if not is_distributed():
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view_as(t).to(t.dtype))
        start += t.numel()
    return tuple(out)


def host_group():
    """A gloo group for sums of host numbers: on GPUs (nccl) it keeps them off the device, so summing
    them never waits for the GPU. The default group when that already is gloo."""
    if dist.get_backend() == "gloo":
        return None
    if "group" not in _HOST_GROUP:
        _HOST_GROUP["group"] = dist.new_group(backend="gloo")  # collective: every rank gets here together
    return _HOST_GROUP["group"]


def sum_numbers(values: list) -> list:
    """Host numbers summed over all ranks (one all_reduce on the CPU; float64: exact below 2^53)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, group=host_group())
    return t.tolist()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """rank src's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy_process_group() -> None:
    """Destroy the process group once gloo's worker threads have let go of the last collectives.

    A gloo worker thread drops a finished collective, and the tensors it holds (which takes the GIL),
    just after the caller's wait() has returned. If the interpreter is already shutting down by then,
    the thread is ended inside a C++ destructor and the process aborts ("terminate called without an
    active exception", after everything is saved): 2 of 10 ZeRO-3 offload runs on a loaded 2-core
    machine, 0 of 20 with this pause, which leaves the GIL to those threads.
    """
    if dist.get_backend() == "gloo" or _HOST_GROUP:
        time.sleep(0.5)
    _HOST_GROUP.clear()
    dist.destroy_process_group()


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
