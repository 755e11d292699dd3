"""DistributedDataParallel: a full replica per rank. The default under torchrun with WORLD_SIZE > 1,
because it runs every model and every peft_type (QLoRA included). Checkpoints as one process's."""

from __future__ import annotations

import contextlib
import inspect

from mftcore.parallel.engine import Engine


class DDPEngine(Engine):
    name = "ddp"
    label = "ddp"  # in messages
    multi_process = True

    @classmethod
    def wrap(cls, loss_model, cfg, env, *, dtype, make_optimizer, scaler=None, moe=None) -> "DDPEngine":
        return cls(apply_ddp(loss_model, moe=moe is not None), loss_model.model, make_optimizer(loss_model.model),
                   rank=env.rank, world_size=env.world_size, scaler=scaler, peft=cfg.peft_type is not None)

    @contextlib.contextmanager
    def accumulate(self, last: bool):
        if last:
            yield
            return
        with self.module.no_sync():
            yield


def apply_ddp(loss_model, moe: bool = False):
    from torch.nn.parallel import DistributedDataParallel

    # No buffer sync in forward: the only buffers (rotary frequencies) are equal on every rank, and a
    # broadcast in every forward would be one more collective per micro-batch and per evaluation batch
    # (torch 2.13 renamed the switch; 2.11 knows only broadcast_buffers).
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    # MoE: an expert that no token of a micro-batch reaches may get no gradient (it depends on the
    # model's expert implementation), and DDP then has to look for unused parameters.
    return DistributedDataParallel(loss_model, find_unused_parameters=moe, gradient_as_bucket_view=True, **no_sync)
