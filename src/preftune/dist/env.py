"""Processes under torchrun: who am I, sum across ranks, and how a global batch is split."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


_JOINED: set[int] = set()  # processes whose process group init_from_env created (and shutdown may destroy)


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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        # Before the process group: NCCL binds each rank to the current device, which must be its own GPU.
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        _JOINED.add(os.getpid())
    env = DistEnv(dist.get_rank(), dist.get_world_size(), local_rank)
    if not env.is_main:  # every rank would repeat the same warnings; rank 0 speaks for all, errors excepted
        logging.getLogger("preftune").setLevel(logging.ERROR)
    return env


def rank_device(device: torch.device, env: DistEnv) -> torch.device:
    """The device this rank computes on: its own GPU under torchrun (cuda:LOCAL_RANK), else `device` itself."""
    if device.type == "cuda" and env.enabled:
        return torch.device("cuda", env.local_rank)
    return device


def is_main_process() -> bool:
    """Rank 0, or the only process; readable before (or without) joining the process group."""
    return int(os.environ.get("RANK", "0")) == 0


def shutdown(env: DistEnv) -> None:
    """Wait for every rank, then leave the process group if this run joined it (a caller that set one up
    itself, to run several trainings in a row, keeps it: joining again in the same process is not reliable)."""
    if env.enabled and dist.is_initialized():
        dist.barrier()
        if os.getpid() in _JOINED:
            _JOINED.discard(os.getpid())
            dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks, returned on `value`'s device. NCCL reduces only GPU tensors, so small CPU values (counts,
    metric sums, stop flags) travel through this rank's GPU and come back."""
    if not env.enabled:
        return value
    home = value.device
    work = value.clone()
    if dist.get_backend() == "nccl" and home.type != "cuda":
        work = work.to(torch.device("cuda", env.local_rank))
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(home)


def rank_slice(indices: list[int], env: DistEnv) -> list[int]:
    """This rank's contiguous slice of a global batch (equal sizes: the global batch is a multiple of world)."""
    per = len(indices) // env.world_size
    return indices[env.rank * per:(env.rank + 1) * per]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
