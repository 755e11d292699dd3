"""Two ranks share kernel tuning (tests/parallel/test_tuning.py launches this with torchrun, gloo):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/tuning_ranks.py

Each rank's `tune` would time made-up candidates with timings of its own (rank 1 would choose differently);
prints one JSON line per rank: what it timed and what it chose, before and after the broadcast.
"""

import json
import sys
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.distributed as dist

from mftcore.kernels import autotune
from mftcore.parallel.comm import destroy_process_group
from mftcore.parallel.tuning import share_kernel_tuning


class Cfg(NamedTuple):
    block: int


CANDIDATES = [Cfg(64), Cfg(128), Cfg(256)]
KEY = {"device": "fake-gpu", "dtype": "bfloat16", "N": 8192}


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    timed = []

    def measure(cfg):
        timed.append(cfg.block)
        return {0: {64: 3.0, 128: 1.0, 256: 2.0}, 1: {64: 1.0, 128: 3.0, 256: 2.0}}[rank][cfg.block]

    def tune(shapes, device):
        autotune.choose("op", KEY, CANDIDATES, CANDIDATES[0], measure, mode="measure")

    shared = share_kernel_tuning(SimpleNamespace(rank=rank, device=torch.device("cpu")), None, tune)
    near = autotune.choose("op", dict(KEY, N=2048), CANDIDATES, CANDIDATES[0], measure, mode="measure")
    exact = autotune.choose("op", KEY, CANDIDATES, CANDIDATES[0], measure, mode="measure")
    print(json.dumps({"rank": rank, "timed": timed, "shared": shared, "exact": exact.block, "near": near.block}),
          flush=True)
    destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
