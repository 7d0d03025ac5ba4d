"""Distributed setup from torchrun's environment alone; the same code runs as one process."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> Dist:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU), or run alone."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("RANK", -1)) == -1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if cuda else "cpu"))


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
