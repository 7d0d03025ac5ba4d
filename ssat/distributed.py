"""Distributed setup from torchrun's environment alone; the same code runs as one process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: its rank among `world_size` processes, its device, and
    (with several processes) a gloo group for small host-side messages, which never wait on a
    device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    host_group: Any = field(default=None, compare=False, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def print0(dist_ctx: DistContext, *args) -> None:
    if dist_ctx.main:
        print(*args, flush=True)


def setup(device: str | None = None) -> DistContext:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU), or run alone.
    `device` is MAE's `--device`: "cuda" (the default where CUDA is available), "cpu", or
    "cuda:N" for one process; under torchrun the local rank picks the GPU."""
    chosen = checked_device(device)
    if int(os.environ.get("RANK", -1)) == -1:
        if chosen.type == "cpu":
            return DistContext()
        index = chosen.index or 0
        torch.cuda.set_device(index)
        return DistContext(device=torch.device("cuda", index))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if chosen.index is not None and chosen.index != local:
        raise ValueError(
            f"--device {device}: with several processes each one's GPU is its local rank "
            f"({local} here); pass --device cuda"
        )
    cuda = chosen.type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    where = torch.device(f"cuda:{local}" if cuda else "cpu")
    return DistContext(rank, world, local, where, host_group=dist.new_group(backend="gloo"))


def checked_device(device: str | None) -> torch.device:
    """A `--device` value as a torch.device, checked against what this machine has."""
    available = torch.cuda.is_available()
    if device is None:
        return torch.device("cuda" if available else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected cuda, cuda:N or cpu") from None
    if chosen.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {device!r}: expected cuda, cuda:N or cpu")
    if chosen.type == "cuda" and not available:
        raise ValueError(f"--device {device}: no CUDA device is visible to this process")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
        )
    return chosen


def teardown(dist_ctx: DistContext) -> None:
    if dist_ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(tensor: torch.Tensor, dist_ctx: DistContext) -> torch.Tensor:
    if dist_ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def host_max(value: int, dist_ctx: DistContext) -> int:
    """The largest of every rank's `value`, through the host group (a CPU tensor: no device
    sync). Every rank must call it at the same point."""
    if not dist_ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=dist_ctx.host_group)
    return int(tensor[0])


def gather_to_main(obj: Any, dist_ctx: DistContext) -> list[Any] | None:
    """Every rank's `obj` (picklable, CPU tensors), indexed by rank, on the main rank; None on
    the others. Every rank must call it at the same point."""
    if not dist_ctx.enabled:
        return [obj]
    gathered = [None] * dist_ctx.world_size if dist_ctx.main else None
    dist.gather_object(obj, gathered, dst=0, group=dist_ctx.host_group)
    return gathered


def broadcast_from_main(obj: Any, dist_ctx: DistContext) -> Any:
    """The main rank's `obj` (picklable) on every rank, over the host group. Every rank must
    call it at the same point."""
    if not dist_ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=dist_ctx.host_group)
    return box[0]


def barrier(dist_ctx: DistContext) -> None:
    """Wait until every rank gets here (over the host group: no device work is waited for)."""
    if dist_ctx.enabled:
        dist.barrier(group=dist_ctx.host_group)
