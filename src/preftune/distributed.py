"""Processes under torchrun: who am I, sum across ranks, and how a global batch is split."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str = "cpu") -> DistEnv:
    """Join the process group torchrun describes in the environment; a single process when there is none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def shard(indices: list[int], env: DistEnv) -> list[int]:
    """This rank's contiguous slice of a global batch (equal sizes: the global batch is a multiple of world)."""
    per = len(indices) // env.world_size
    return indices[env.rank * per:(env.rank + 1) * per]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
