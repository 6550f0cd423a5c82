"""Distributed data parallel under ``torchrun``: process group set-up, the device, reductions.

``torchrun --nproc_per_node=N`` (and its multi-node form) sets RANK, WORLD_SIZE and LOCAL_RANK; without
them everything runs in one process and the helpers below are no-ops. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from effvit.data.device import resolve_device


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        host_group()  # created now, collectively, rather than at its first use
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


_host_group: dist.ProcessGroup | None = None


def host_group() -> dist.ProcessGroup | None:
    """A gloo group of all ranks for agreeing on host-side values (None when the default group is gloo):
    NCCL reduces device tensors only, which costs a sync with the device. Created collectively."""
    global _host_group
    if _host_group is None and dist.get_backend() != "gloo":
        _host_group = dist.new_group(backend="gloo")
    return _host_group


def cleanup() -> None:
    global _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over all ranks (identity in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` of all ranks, agreed on the host (no device sync); ``value`` in one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=host_group())
    return int(t)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank: every rank then takes the same branch (no hang)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] (a one-element list in one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
