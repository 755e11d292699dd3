"""How a run uses its processes: one switch, `distributed_type`, names an engine of ENGINES.

  none       one process: the default of a plain `mftcore train`              (engine.py)
  ddp        DistributedDataParallel, a full replica per rank: the default under torchrun with
             WORLD_SIZE > 1, because it runs every model and every peft_type   (ddp.py)
  fsdp       FSDP2: parameters, gradients and optimizer state sharded           (fsdp.py)
  deepspeed  DeepSpeed ZeRO stage 2 or 3 from `deepspeed_config`                (deepspeed.py)

Launch: `python -m torch.distributed.run --nproc_per_node N -m mftcore train cfg.json` (torchrun).
An engine is applied to the untouched model; train.py and checkpoint.py use only the Engine interface.
A new engine is one file with an Engine subclass and one line in ENGINES.
"""

from __future__ import annotations

from mftcore.errors import ConfigError
from mftcore.parallel.ddp import DDPEngine
from mftcore.parallel.deepspeed import DeepSpeedEngine
from mftcore.parallel.engine import Engine
from mftcore.parallel.env import Dist, device_for, join, ranks, teardown
from mftcore.parallel.fsdp import FSDPEngine

ENGINES = {"none": Engine, "ddp": DDPEngine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}

__all__ = ["ENGINES", "Dist", "Engine", "choose_engine", "engine_of_format", "join", "setup", "teardown", "wrap"]


def choose_engine(cfg, world_size: int) -> str:
    """cfg.distributed_type, or when it is unset: deepspeed if deepspeed_config is given, else ddp for
    more than one process and none for one; checked against what that engine can run."""
    name = cfg.distributed_type
    if name is None:
        name = "deepspeed" if cfg.deepspeed_config is not None else "ddp" if world_size > 1 else "none"
    if name not in ENGINES:
        raise ConfigError(f"distributed_type: {name!r} is not supported (choose from {', '.join(ENGINES)})")
    if cfg.deepspeed_config is not None and name != "deepspeed":
        raise ConfigError(f"deepspeed_config: set, but distributed_type is {name!r}; remove one of them")
    ENGINES[name].check_config(cfg, world_size)
    return name


def setup(cfg) -> Dist:
    """Rank, device and engine of this process; no collective yet (join)."""
    rank, world, local = ranks()
    name = choose_engine(cfg, world)
    return Dist(rank, world, local, device_for(local), name)


def wrap(loss_model, cfg, env: Dist, **kwargs) -> Engine:
    """env.engine's Engine around the untouched LossModel (see Engine.wrap for the keywords)."""
    return ENGINES[env.engine].wrap(loss_model, cfg, env, **kwargs)


def engine_of_format(fmt: str) -> type[Engine]:
    """The engine class that reads checkpoints of this format (for export and error messages)."""
    for engine in ENGINES.values():
        if engine.format == fmt:
            return engine
    raise KeyError(fmt)
