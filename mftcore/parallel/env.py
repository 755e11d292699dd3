"""Where this process stands in a run: rank, world size and device from torchrun's environment, the
chosen engine's name, and the process group's life (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    engine: str  # a key of mftcore.parallel.ENGINES
    owns_group: bool = False  # this process group was created by join() and is destroyed by teardown()


def ranks() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them, or of the process group that already runs;
    (0, 1, 0) for a plain process. The one place mftcore reads them."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, local_rank()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def join(env: Dist, timeout_seconds: int | None = None) -> None:
    """Create the process group unless it exists or one process runs alone.

    The trainer calls this after loading the data: tokenizing forks worker processes, and a process
    that forks once the process group's threads run can leave its children waiting on a lock one of
    those threads held (seen here as a hang after two process groups had come and gone in a process).
    """
    if env.engine == "none" or dist.is_initialized():
        return
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    kwargs = {"timeout": timedelta(seconds=timeout_seconds)} if timeout_seconds else {}
    if "MASTER_ADDR" in os.environ:  # torchrun
        dist.init_process_group(backend, **kwargs)
    else:  # a plain process that asked for an engine: a group of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    env.owns_group = True


def teardown(env: Dist) -> None:
    from mftcore.parallel.comm import destroy_process_group

    if env.owns_group and dist.is_initialized():
        destroy_process_group()
