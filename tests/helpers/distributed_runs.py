"""Several `mftcore train` runs in one torchrun launch, for tests/parallel/test_distributed.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/distributed_runs.py A.json B.json ...

Starting Python, torch, transformers and DeepSpeed costs each process several seconds on a shared
2-core machine; here the processes and the process group (gloo) are shared by all the runs, and each
run goes through the same CLI entry point as `-m mftcore train`. Stops at the first failing run.
"""

import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)  # see tests/conftest.py: tiny models, and two processes on two cores

from mftcore.cli import main  # noqa: E402
from mftcore.parallel.comm import destroy_process_group  # noqa: E402

if __name__ == "__main__":
    dist.init_process_group("gloo")
    for config in sys.argv[1:]:
        code = main(["train", config])
        if code:
            sys.exit(code)
    destroy_process_group()  # with the pause that keeps gloo's threads from aborting the exit
