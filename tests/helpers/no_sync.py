"""A CPU stand-in for torch.cuda.set_sync_debug_mode("error"): inside `no_host_reads()`, reading a tensor's
values on the host (.item(), .tolist(), .numpy(), bool/int/float/index of a tensor, which Python branching
on a tensor value calls) raises HostRead. On a GPU each of those waits for the device; on the CPU they are
what such a wait would be. Reads that torch makes inside its own C++ (nonzero, masked indexing) are not
seen here: tests on a GPU use set_sync_debug_mode for those.
"""

from __future__ import annotations

import contextlib

import torch

READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def forbid(name):
        def read(self, *args, **kwargs):
            raise HostRead(f"Tensor.{name}() on a {tuple(self.shape)} {self.dtype} tensor: a host read")
        return read

    for name in READS:
        setattr(torch.Tensor, name, forbid(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
