"""The base Engine: one process trains a LossModel (decoder + fused loss) with its optimizer; its
checkpoints are HF safetensors (or the PEFT adapter) plus optimizer.pt, written by rank 0.

An engine owns everything that differs between ways of running a step: how the module is wrapped,
whether gradients are reduced in a micro-batch, how the loss goes backward, how the update is clipped,
applied or skipped, and which files a checkpoint holds. mftcore/checkpoint.py calls `save` / `load`
and never asks which engine it has; mftcore/train.py calls `accumulate`, `backward` and `step`.

Gradient scale: loss.step_token_scales makes the SUM over ranks of every rank's loss the step loss,
while DDP, FSDP2 and DeepSpeed AVERAGE gradients over ranks, so `backward` multiplies the loss by the
world size. The result is the gradient of one big batch (tests/parallel/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import os

import torch

from mftcore.errors import ConfigError
from mftcore.integrity import WEIGHT_FILES, CheckpointError, load_torch_file, torch_file_problem, weights_problem
from mftcore.io import read_json_object

# step()'s skip codes: why an update was not applied (0: it was).
SKIP_REASONS = (None, "loss", "gradient", "fp16 overflow")


class Engine:
    name = "none"
    label = "one-process"  # in messages
    format = "hf"  # what its checkpoints hold; a checkpoint resumes only under an engine of its format
    multi_process = False  # runs with WORLD_SIZE > 1
    casts_itself = False  # mixed precision from the engine's own policy, not autocast / GradScaler
    shards_model = False  # the model is built on the CPU and each shard moved to the device as it is cut

    def __init__(self, module, model, optimizer, *, rank: int = 0, world_size: int = 1, scaler=None,
                 peft: bool = False):
        """module: the LossModel (as wrapped); model: the HF (or PEFT) model inside it."""
        self.module, self.model, self.optimizer, self.scaler = module, model, optimizer, scaler
        self.rank, self.world_size, self.peft = rank, world_size, peft
        self.params = [p for p in module.parameters() if p.requires_grad]

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg, world_size: int) -> None:
        """A one-line ConfigError for what this engine cannot run."""
        if world_size > 1 and not cls.multi_process:
            raise ConfigError(f"distributed_type: \"{cls.name}\" runs one process, but WORLD_SIZE={world_size}; "
                              "choose ddp, fsdp or deepspeed (or leave it unset)")

    @classmethod
    def wrap(cls, loss_model, cfg, env, *, dtype: torch.dtype, make_optimizer, scaler=None, moe=None) -> "Engine":
        """The engine around an untouched LossModel; make_optimizer(model) once the parameters are final."""
        return cls(loss_model, loss_model.model, make_optimizer(loss_model.model), rank=env.rank,
                   world_size=env.world_size, scaler=scaler, peft=cfg.peft_type is not None)

    # --- one optimizer step -------------------------------------------------------------------------
    @contextlib.contextmanager
    def accumulate(self, last: bool):
        """Gradients are reduced over ranks in the last micro-batch of a step only (one process: always)."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.world_size > 1:
            loss = loss * self.world_size  # the engines average over ranks; our scales want the sum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip(self, max_grad_norm: float) -> torch.Tensor:
        max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def step(self, max_grad_norm: float, total_loss: torch.Tensor) -> tuple:
        """Clip and apply the update, unless the step's loss (summed over ranks) or the gradient norm is not
        finite; then zero the gradients. Returns (grad_norm, skip code: an index of SKIP_REASONS).

        With a fused optimizer (all parameters on a GPU) the skip is decided on the device, through the
        found_inf argument of fused AdamW: nothing is read back to the host. Otherwise (CPU, where a read
        costs nothing, and the fp16 loss scaler, which reads found_inf itself) the decision is a host read.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self.clip(max_grad_norm)
        if self.scaler is None and self.optimizer.defaults.get("fused"):
            bad_loss, bad_grad = ~torch.isfinite(total_loss), ~torch.isfinite(grad_norm)
            self.optimizer.found_inf = (bad_loss | bad_grad).float()  # GradScaler's protocol with fused AdamW
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm, torch.where(bad_loss, 1, torch.where(bad_grad, 2, 0))
        finite = torch.stack([torch.isfinite(total_loss), torch.isfinite(grad_norm)]).tolist()  # one read
        code = 0 if all(finite) else 1 if not finite[0] else 3 if self.scaler is not None else 2
        if code == 0 and self.scaler is not None:
            self.scaler.step(self.optimizer)
        elif code == 0:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # an overflow lowers the scale
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, code

    # --- checkpoints --------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Weights, optimizer (and loss scaler) state into a checkpoint directory; every rank calls it."""
        if self.rank == 0:
            self.model.save_pretrained(directory, safe_serialization=True)
            torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), os.path.join(directory, "scaler.pt"))

    def load(self, directory: str, saved: dict) -> None:
        """The reverse of `save`; `saved` is the checkpoint's trainer state."""
        load_model_weights(directory, self.model)
        device = next(self.model.parameters()).device
        optimizer_state = load_torch_file(os.path.join(directory, "optimizer.pt"), map_location=device)
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, RuntimeError) as e:  # other parameter groups or shapes
            raise ConfigError(f"resume_from_checkpoint: {directory}: its optimizer state does not fit this run's "
                              f"parameters ({str(e).splitlines()[0][:160]}); was it saved with another model or "
                              "peft_type?") from None
        scaler_file = os.path.join(directory, "scaler.pt")
        if self.scaler is not None and os.path.isfile(scaler_file):
            self.scaler.load_state_dict(load_torch_file(scaler_file))

    def full_state_dict(self):
        """The whole model's weights on rank 0 for final/, when `model` holds only a shard of them
        (collective); None when rank 0's model holds them all."""
        return None

    @classmethod
    def load_weights(cls, directory: str, model, peft: bool) -> None:
        """A checkpoint's weights into a plain model in one process (`mftcore export`)."""
        load_model_weights(directory, model)

    # --- checkpoint files, checked before anything is loaded (mftcore/checkpoint.py) -----------------
    @classmethod
    def holds(cls, directory: str) -> bool:
        """Whether `directory` holds this engine's checkpoint files: a checkpoint's format is read off its
        files, and a `format` claim in trainer_state.json that they contradict is refused."""
        return any(os.path.isfile(os.path.join(directory, name)) for name in WEIGHT_FILES)

    @classmethod
    def files_problem(cls, directory: str, state: dict) -> str | None:
        """Why this engine's files in a checkpoint are not whole (missing, truncated, not loadable
        without unpickling code), or None."""
        problem = weights_problem(directory)
        if problem:
            return problem
        for name in ("optimizer.pt", "scaler.pt"):
            path = os.path.join(directory, name)
            if name == "optimizer.pt" and not os.path.isfile(path):
                return f"{name} is missing"
            if os.path.isfile(path):
                problem = torch_file_problem(path)
                if problem:
                    return problem
        return None


def read_safetensors(path: str, stem: str) -> dict:
    """{name: tensor} of `stem`.safetensors, or of all shards listed by `stem`.safetensors.index.json."""
    from safetensors.torch import load_file

    single = os.path.join(path, f"{stem}.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = single + ".index.json"
    if not os.path.isfile(index):
        raise ConfigError(f"resume_from_checkpoint: {path}: no {stem}.safetensors")
    shards = sorted(set(read_json_object(index, error=CheckpointError)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(load_file(os.path.join(path, shard)))
    return state


def load_model_weights(path: str, model) -> None:
    """The checkpoint's weights into `model` (adapter weights for a PeftModel), in place."""
    from mftcore.model.lora import is_adapter_model

    try:
        if is_adapter_model(model):
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, read_safetensors(path, "adapter_model"))
        else:
            result = model.load_state_dict(read_safetensors(path, "model"), strict=False)
    except RuntimeError as e:  # "size mismatch for ...": another model_config
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
        raise ConfigError(f"resume_from_checkpoint: {path}: its weights do not fit this model ({detail[:200]}); "
                          "was it saved with another model_config or pretrained_model_path?") from None
    if is_adapter_model(model):
        missing = [k for k in result.missing_keys if "lora_" in k]
    else:
        # Tied weights (lm_head = embed_tokens) are saved once; they come back through their twin.
        own = model.state_dict()
        loaded_ptrs = {own[k].data_ptr() for k in own if k not in set(result.missing_keys)}
        missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
    if missing:
        raise ConfigError(f"resume_from_checkpoint: {path}: the checkpoint lacks {missing[:3]} "
                          f"(was it saved from another model or peft_type?)")
