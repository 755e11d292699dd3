"""FSDP2: `fully_shard` on every decoder layer, then on the root; parameters, gradients and optimizer
state sharded over the ranks; full fine-tuning and LoRA. Checkpoints are torch.distributed.checkpoint
shards in dcp/ (every rank writes its own), which `mftcore export` gathers into one HF directory."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from mftcore.errors import ConfigError
from mftcore.parallel.engine import Engine


class FSDPEngine(Engine):
    name = "fsdp"
    label = "fsdp"  # in messages
    format = "dcp"
    multi_process = True
    casts_itself = True  # the MixedPrecisionPolicy casts parameters; no autocast, no loss scaler
    shards_model = True

    @classmethod
    def check_config(cls, cfg, world_size: int) -> None:
        if cfg.peft_type == "qlora":
            raise ConfigError("distributed_type: fsdp cannot shard 4-bit QLoRA weights; use deepspeed (ZeRO-2) or ddp")
        if cfg.mixed_precision == "fp16":
            raise ConfigError("mixed_precision: fp16 needs a loss scaler, which mftcore's FSDP2 path does not run; "
                              "use bf16")

    @classmethod
    def wrap(cls, loss_model, cfg, env, *, dtype, make_optimizer, scaler=None, moe=None) -> "FSDPEngine":
        module = apply_fsdp(loss_model, cfg.model_type, dtype, env.device)
        return cls(module, loss_model.model, make_optimizer(loss_model.model), rank=env.rank,
                   world_size=env.world_size, peft=cfg.peft_type is not None)

    @contextlib.contextmanager
    def accumulate(self, last: bool):
        self.module.set_requires_gradient_sync(last)
        yield

    def clip(self, max_grad_norm: float) -> torch.Tensor:
        return super().clip(max_grad_norm).full_tensor()  # a DTensor holding the global norm

    def save(self, directory: str) -> None:
        """Every rank writes its shards of the model and optimizer state (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=frozen_free_options(self.peft))
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, "dcp"))

    def load(self, directory: str, saved: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        options = frozen_free_options(self.peft)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(directory, "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)

    def full_state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self.model, options=frozen_free_options(self.peft, full_state_dict=True,
                                                                          cpu_offload=True))
        return sd if self.rank == 0 else None

    @classmethod
    def load_weights(cls, directory: str, model, peft: bool) -> None:
        """An FSDP2 checkpoint's model weights into a plain (unsharded) model, in one process."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        options = frozen_free_options(peft)
        state = {"model": get_model_state_dict(model, options=options)}
        dcp.load(state, checkpoint_id=os.path.join(directory, "dcp"), no_dist=not dist.is_initialized())
        set_model_state_dict(model, state["model"], options=options)


    @classmethod
    def holds(cls, directory: str) -> bool:
        return os.path.isfile(os.path.join(directory, "dcp", ".metadata"))

    @classmethod
    def files_problem(cls, directory: str, state: dict) -> str | None:
        """dcp/: its .metadata through the restricted unpickler (DCP itself unpickles it with no limits),
        and every shard it names present and long enough."""
        from mftcore.integrity import dcp_problem

        return dcp_problem(os.path.join(directory, "dcp"))


def frozen_free_options(peft: bool, **kwargs):
    """LoRA checkpoints hold the adapters only (the frozen base comes from pretrained_model_path), so
    loading them is not strict; a key the checkpoint lacks still fails in dcp.load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=peft, strict=not peft, **kwargs)


def apply_fsdp(loss_model, model_type, dtype: torch.dtype, device: torch.device):
    """fully_shard each decoder layer (the class from the family table or `_no_split_modules`), then the
    root, which holds the embeddings, the final norm and the LM head. Half-precision matmuls come from
    the policy (parameters all-gathered in `dtype`, gradients reduced in fp32), not autocast."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from mftcore.model.decoder import causal_lm
    from mftcore.model.families import decoder_layer_class

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layer_class = decoder_layer_class(causal_lm(loss_model.model), model_type)
    param_dtype = None if dtype == torch.float32 else dtype
    layers = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in list(loss_model.modules()):
        if isinstance(module, layer_class):
            fully_shard(module, mesh=mesh, mp_policy=layers)
    # The root's inputs stay as they are: the per-token loss scales must not be cast to bf16.
    root = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fully_shard(loss_model, mesh=mesh, mp_policy=root)
    return loss_model
