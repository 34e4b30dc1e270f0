"""torchrun process groups, DDP / FSDP2 wrapping, rank helpers, reductions and full (gathered) state dicts."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from e2evlp.nn.attention import DecoderBlock, SelfAttentionBlock

MODES = ("ddp", "fsdp")
# The encoder and decoder layers: each becomes one FSDP2 unit, gathered just before it runs.
SHARD_UNITS = (SelfAttentionBlock, DecoderBlock)
# Rank 0 gathers the whole model on the CPU; the other ranks get empty dicts (they do not save).
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: str | torch.device | None = None) -> torch.device:
    """Joins torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK) when WORLD_SIZE > 1 and returns this
    process's device: cuda:LOCAL_RANK with NCCL when CUDA is available, the CPU with gloo otherwise.

    Without torchrun (or with WORLD_SIZE=1) no process group is made. Calling it again is harmless."""
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if _env_int("WORLD_SIZE", 1) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return device


def shutdown() -> None:
    """Leaves the process group, if one was joined (recent PyTorch warns at exit otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all ranks, as a new tensor (a copy when there is no process group)."""
    reduced = tensor.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        reduced /= dist.get_world_size()
    return reduced


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def torch_rng_state(device: torch.device) -> dict:
    """This rank's torch generators (dropout's stream), to save beside the other ranks'."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_torch_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def wrap_model(model: nn.Module, mode: str, device: torch.device, *,
               shard_units: tuple[type[nn.Module], ...] = SHARD_UNITS,
               find_unused_parameters: bool = False) -> nn.Module:
    """DDP (`mode="ddp"`) or FSDP2 (`mode="fsdp"`: `fully_shard` on every `shard_units` instance, then on the
    root) over the process group; `model` unchanged without one. `model` must already be on `device`.

    FSDP2 replaces the parameters by sharded DTensors in place: build the optimizer after wrapping."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if mode == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=find_unused_parameters)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in model.modules():
        if isinstance(module, shard_units):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Forward and backward inside it reduce gradients across ranks only if `enabled`: gradient accumulation
    turns it off on all micro-batches but the last."""
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def to_local(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor holding `tensor`'s full value (FSDP2's gradient norm is a DTensor)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_model_state_dict(model: nn.Module) -> dict:
    """The unsharded model state on rank 0's CPU (empty on the other ranks); every rank must call it."""
    return get_model_state_dict(model, options=FULL_STATE)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimizer state keyed by parameter name, on rank 0's CPU; every rank must call it."""
    return get_optimizer_state_dict(model, optimizer, options=FULL_STATE)


def load_full_model_state_dict(model: nn.Module, state: dict) -> None:
    """Shards a full model state (as `full_model_state_dict` gives it, read on every rank) into `model`."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shards a full optimizer state (from `full_optimizer_state_dict`, read on every rank) into `optimizer`."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
