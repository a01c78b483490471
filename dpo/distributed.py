"""torchrun support: process-group set-up, rank helpers, metric reduction, DDP / FSDP2 wrapping.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for a single process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from dpo.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """This process's place under torchrun: its rank, the world size and its local rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is the main process (rank 0), which logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process runs."""
        return self.world_size > 1


# How long a collective waits for the slowest process: the others wait at a barrier while the main process alone
# saves a checkpoint, writes final/ or samples for --eval-generate, which for phi-2 can outlast torch's 10 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def init_distributed(device_type: str) -> DistInfo:
    """The torchrun process group (NCCL bound to this process's GPU, gloo on CPUs), or one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device_type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT,
                                device_id=torch.device("cuda", local_rank) if cuda else None)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


class PeerStoppedError(UserError):
    """This process stopped because another one did (whose own error says why)."""


# how a collective fails when a peer process has exited (gloo's RuntimeError, NCCL's DistBackendError); another
# failure of a collective (a timeout, an NCCL error of its own) is not one, and keeps its traceback
_PEER_GONE = re.compile(r"closed by peer|reset by peer|remote worker|remote process exited|communicator was aborted|"
                        r"broken pipe", re.IGNORECASE)


def peer_stopped(error: BaseException) -> bool:
    """Whether `error` is a collective (a barrier, a gather) failing because another process has stopped."""
    return isinstance(error, RuntimeError) and _PEER_GONE.search(str(error)) is not None


def shutdown_distributed() -> None:
    """Destroy the process group, where one was set up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (in place where distributed); a no-op in one process."""
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather(items: list, info: DistInfo) -> list:
    """Every process's `items`, concatenated in process order (the same list on every process)."""
    if not info.enabled:
        return items
    parts: list[list] = [[] for _ in range(info.world_size)]
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def barrier(info: DistInfo) -> None:
    """Wait for every process; a no-op in one process."""
    if info.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if it is true on any rank."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def wrap_model(scorer: nn.Module, info: DistInfo, *, fsdp: bool, device: torch.device,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP by default; FSDP2 (`fully_shard`, each decoder layer then the root) with `fsdp=True`. `param_dtype`: the
    autocast dtype of a half-precision run, in which FSDP2 gathers the fp32 shards (half the traffic and the
    unsharded copies' memory); gradients are still reduced in fp32."""
    if not info.enabled:
        return scorer
    if fsdp:
        # only --fsdp needs it
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for module in scorer.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module, mp_policy=policy)
        return fully_shard(scorer, mp_policy=policy)
    device_ids = [device.index] if device.type == "cuda" else None
    # gradients live in the communication buckets: no second copy of every gradient
    return nn.parallel.DistributedDataParallel(scorer, device_ids=device_ids, gradient_as_bucket_view=True)


@contextlib.contextmanager
def no_sync(model: nn.Module, sync: bool):
    """Skip the gradient reduction on accumulation micro-batches that are not the last (DDP and FSDP2)."""
    if sync:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# Full (unsharded, CPU) state dicts, keyed by parameter name: the same files whatever the world size,
# so a checkpoint written by N processes (DDP or FSDP) reloads in M. Collective under torchrun.
def _full_options():
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module, prefix: str = "model.", trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The wrapped model's weights as plain CPU tensors, with `prefix` (the scorer's attribute) removed;
    `trainable_only`: the parameters that train (LoRA's adapters), not the frozen base."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, unsharded on CPU (collective under torchrun)."""
    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (`full_optimizer_state`'s) into the possibly sharded optimizer. On the CPU the
    optimizer would keep the loaded tensors themselves: they are copied, so that a memory-mapped checkpoint file
    is let go (its disk space freed once the checkpoint rotates out)."""
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
    for parameter_state in optimizer.state.values():
        for key, value in parameter_state.items():
            if torch.is_tensor(value) and value.device.type == "cpu":
                parameter_state[key] = value.clone()
