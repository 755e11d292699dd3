"""Multi-process training behind one switch, `distributed_type`:

  none       one process: the default of a plain `mftcore train`
  ddp        DistributedDataParallel, a full replica per rank: the default under torchrun with
             WORLD_SIZE > 1, because it runs every model and every peft_type (QLoRA included)
  fsdp       FSDP2: `fully_shard` on every decoder layer, then on the root; parameters, gradients
             and optimizer state sharded over the ranks; full fine-tuning and LoRA
  deepspeed  DeepSpeed ZeRO stage 2 or 3 from `deepspeed_config` (mftcore/zero.py)

Launch: `python -m torch.distributed.run --nproc_per_node N -m mftcore train cfg.json` (torchrun);
the process group is gloo on CPU, nccl on GPU. The functions here are applied to the untouched
model; `Engine` is what train_step and evaluation drive.

Gradient scale: loss.step_token_scales makes the SUM over ranks of every rank's loss the step loss,
while DDP, FSDP2 and DeepSpeed all AVERAGE gradients over ranks, so every engine multiplies the loss
by the world size before backward. The result is the gradient of one big batch: the losses of a
2-process run match one process with the same global batch to 1e-5 (tests/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mftcore.errors import ConfigError

ENGINES = ("none", "ddp", "fsdp", "deepspeed")


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    engine: str  # one of ENGINES
    owns_group: bool = False  # this process group was created by setup() and is destroyed by teardown()


def choose_engine(cfg, world_size: int) -> str:
    """cfg.distributed_type, or when it is unset: deepspeed if deepspeed_config is given, else ddp for
    more than one process and none for one."""
    kind = cfg.distributed_type
    if kind is None:
        kind = "deepspeed" if cfg.deepspeed_config is not None else "ddp" if world_size > 1 else "none"
    if kind == "none" and world_size > 1:
        raise ConfigError(f"distributed_type: \"none\" runs one process, but WORLD_SIZE={world_size}; "
                          "choose ddp, fsdp or deepspeed (or leave it unset)")
    if cfg.deepspeed_config is not None and kind != "deepspeed":
        raise ConfigError(f"deepspeed_config: set, but distributed_type is {kind!r}; remove one of them")
    if kind == "fsdp" and cfg.peft_type == "qlora":
        raise ConfigError("distributed_type: fsdp cannot shard 4-bit QLoRA weights; use deepspeed (ZeRO-2) or ddp")
    if kind == "fsdp" and cfg.mixed_precision == "fp16":
        raise ConfigError("mixed_precision: fp16 needs a loss scaler, which mftcore's FSDP2 path does not run; "
                          "use bf16")
    return kind


def setup(cfg) -> Dist:
    """Rank, device and engine of this process from torchrun's environment; no collective yet (join)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    kind = choose_engine(cfg, world)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, local_rank, device, kind)


def join(env: Dist, cfg) -> None:
    """Create the process group (gloo on CPU, nccl on GPU) unless it exists or one process runs alone.

    The trainer calls this after loading the data: tokenizing forks worker processes, and a process
    that forks once the process group's threads run can leave its children waiting on a lock one of
    those threads held (seen here as a hang after two process groups had come and gone in a process).
    """
    if env.engine == "none" or dist.is_initialized():
        return
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    kwargs = {"timeout": timedelta(seconds=cfg.init_timeout_seconds)} if cfg.init_timeout_seconds else {}
    if "MASTER_ADDR" in os.environ:  # torchrun
        dist.init_process_group(backend, **kwargs)
    else:  # a plain process that asked for an engine: a group of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    env.owns_group = True


def teardown(env: Dist) -> None:
    if env.owns_group and dist.is_initialized():
        destroy_process_group()


def destroy_process_group() -> None:
    """Destroy the process group once gloo's worker threads have let go of the last collectives.

    A gloo worker thread drops a finished collective, and the tensors it holds (which takes the GIL),
    just after the caller's wait() has returned. If the interpreter is already shutting down by then,
    the thread is ended inside a C++ destructor and the process aborts ("terminate called without an
    active exception", after everything is saved): 2 of 10 ZeRO-3 offload runs on a loaded 2-core
    machine, 0 of 20 with this pause, which leaves the GIL to those threads.
    """
    if dist.get_backend() == "gloo":
        time.sleep(0.5)
    dist.destroy_process_group()


# --- collectives that are no-ops in one process ----------------------------------------------------

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(*tensors: torch.Tensor) -> tuple:
    """The tensors summed over all ranks, in one all_reduce; unchanged in one process."""
    if not is_distributed():
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view_as(t).to(t.dtype))
        start += t.numel()
    return tuple(out)


def sum_numbers(values: list, device) -> list:
    """Host numbers summed over all ranks (one all_reduce, float64: exact for counts below 2^53)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
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


# --- wrapping --------------------------------------------------------------------------------------

def apply_ddp(loss_model, moe: bool = False):
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # No buffer sync in forward: the only buffers (rotary frequencies) are equal on every rank, and a
    # broadcast in every forward would be one more collective per micro-batch and per evaluation batch
    # (torch 2.13 renamed the switch; 2.11 knows only broadcast_buffers).
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    # MoE: an expert that no token of a micro-batch reaches may get no gradient (it depends on the
    # model's expert implementation), and DDP then has to look for unused parameters.
    return DistributedDataParallel(loss_model, find_unused_parameters=moe, gradient_as_bucket_view=True, **no_sync)


def apply_fsdp(loss_model, model_type, dtype: torch.dtype, device: torch.device):
    """FSDP2: fully_shard each decoder layer (the class from the family table or `_no_split_modules`),
    then the root, which holds the embeddings, the final norm and the LM head. Half-precision matmuls
    come from the policy (parameters all-gathered in `dtype`, gradients reduced in fp32), not autocast."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from mftcore.model import causal_lm
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


def wrap_model(model, cfg, env: Dist, *, num_tasks: int, dtype: torch.dtype, make_optimizer, scaler=None,
               moe=None):
    """The Engine of env.engine around the untouched model; builds the optimizer with make_optimizer(model)
    once the parameters are final (FSDP2 replaces them by sharded ones)."""
    from mftcore.model.loss_model import LossModel

    loss_model = LossModel(model, num_tasks)
    if env.engine == "deepspeed":
        from mftcore import zero

        return zero.DeepSpeedEngine.create(loss_model, model, cfg, env, dtype, make_optimizer)
    if env.engine == "fsdp":
        module = apply_fsdp(loss_model, cfg.model_type, dtype, env.device)
    elif env.engine == "ddp":
        module = apply_ddp(loss_model, moe=moe is not None)
    else:
        module = loss_model
    return Engine(module, model, make_optimizer(model), kind=env.engine, rank=env.rank,
                  world_size=env.world_size, scaler=scaler, peft=cfg.peft_type is not None)


class Engine:
    """One process, DDP or FSDP2: forward through `module` (a LossModel, wrapped), backward, clip, step.

    `model` is the HF (or PEFT) model inside, `optimizer` the torch optimizer. Checkpoints: "hf" format
    (safetensors + optimizer.pt, rank 0) for none/ddp, torch.distributed.checkpoint for fsdp.
    """

    def __init__(self, module, model, optimizer, *, kind: str = "none", rank: int = 0, world_size: int = 1,
                 scaler=None, peft: bool = False):
        self.module, self.model, self.optimizer, self.scaler = module, model, optimizer, scaler
        self.kind, self.rank, self.world_size, self.peft = kind, rank, world_size, peft
        self.params = [p for p in module.parameters() if p.requires_grad]

    @property
    def format(self) -> str:
        return "dcp" if self.kind == "fsdp" else "hf"

    @contextlib.contextmanager
    def accumulate(self, last: bool):
        """Gradient reduction over ranks only in the last micro-batch of a step."""
        if self.kind == "ddp" and not last:
            with self.module.no_sync():
                yield
            return
        if self.kind == "fsdp":
            self.module.set_requires_gradient_sync(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.world_size > 1:
            loss = loss * self.world_size  # the engines average over ranks; our scales want the sum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def update(self, max_grad_norm: float, total_loss: torch.Tensor) -> tuple:
        """Clip and step, unless the step's loss (summed over ranks) or the gradient norm is not finite;
        then zero the gradients. Returns (grad_norm, None or why the update was skipped)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
            grad_norm = grad_norm.full_tensor()
        finite = torch.stack([torch.isfinite(total_loss), torch.isfinite(grad_norm)]).tolist()  # one sync
        skipped = None if all(finite) else ("loss" if not finite[0] else "fp16 overflow" if self.scaler else "gradient")
        if skipped is None and self.scaler is not None:
            self.scaler.step(self.optimizer)
        elif skipped is None:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # an overflow lowers the scale
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    # --- checkpoints (format "dcp"; the "hf" format is written by mftcore.checkpoint) ---------------
    def dcp_options(self, **kwargs):
        return frozen_free_options(self.peft, **kwargs)

    def save_sharded(self, directory: str) -> None:
        """FSDP2: every rank writes its shards of the model and optimizer state (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.dcp_options())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, "dcp"))

    def load_sharded(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.dcp_options())
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(directory, "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.dcp_options())

    def full_state_dict(self):
        """The unsharded model state on rank 0 (None elsewhere) for FSDP2; None for the "hf" format,
        where rank 0's model already holds it. Collective."""
        if self.kind != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self.model, options=self.dcp_options(full_state_dict=True, cpu_offload=True))
        return sd if self.rank == 0 else None


def frozen_free_options(peft: bool, **kwargs):
    """LoRA checkpoints hold the adapters only (the frozen base comes from pretrained_model_path), so
    loading them is not strict; a key the checkpoint lacks still fails in dcp.load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=peft, strict=not peft, **kwargs)


def load_sharded_weights(directory: str, model, peft: bool) -> None:
    """An FSDP2 checkpoint's model weights into a plain (unsharded) model, in one process (export)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    options = frozen_free_options(peft)
    state = {"model": get_model_state_dict(model, options=options)}
    dcp.load(state, checkpoint_id=os.path.join(directory, "dcp"), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"], options=options)
