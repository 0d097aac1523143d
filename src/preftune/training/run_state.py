"""What a run changes while it trains, and how to capture it: trained weights, optimizer state, random generators.

`RunState` keeps together everything a checkpoint must hold; the functions here take those parts out of a live
run (gathering them whole under FSDP) and put the random generators back. Writing, reading and resuming
checkpoints is checkpoint.py's job.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..dist import fsdp
from ..dist.env import DistEnv, all_reduce_sum
from ..errors import NonFiniteError

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Everything that changes while a run trains, kept together so that a checkpoint misses nothing."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    cursor: object          # loop.DataCursor
    objective: object       # objectives.*Objective
    step: int = 0           # optimizer steps done
    skipped_steps: int = 0  # steps dropped by --skip-nonfinite
    sharded: bool = False   # the model's weights are split across ranks by FSDP2


# Called on every rank: under FSDP gathering is a collective, and only rank 0 gets the tensors ({} elsewhere).

def gather_trainable_state(model: torch.nn.Module, sharded: bool = False) -> dict[str, torch.Tensor]:
    """{parameter name: tensor on the CPU} for every parameter that trains; frozen weights are not saved."""
    if sharded:
        return fsdp.full_trainable_state(model)
    return {name: p.detach().to("cpu", copy=True).contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


def gather_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None,
                           sharded: bool = False) -> dict:
    """`optimizer.state_dict()`; under FSDP the same layout with whole tensors, on rank 0 only."""
    return fsdp.full_optimizer_state(model, optimizer) if sharded else optimizer.state_dict()


def rng_state() -> dict:
    """The state of every random generator a step can draw from, as plain JSON values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        saved = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
        else:
            log.warning("checkpoint holds random states of %d GPUs, this machine has %d; dropout will not "
                        "repeat exactly", len(saved), torch.cuda.device_count())


def all_rng_states(env: DistEnv) -> list[dict]:
    """Every rank's random states, on every rank (each rank may have drawn differently)."""
    mine = rng_state()
    if not env.enabled:
        return [mine]
    states: list = [None] * env.world_size
    dist.all_gather_object(states, mine)
    return states


def _all_finite(t: torch.Tensor, block: int = 1 << 20) -> bool:
    """torch.isfinite(t).all(), a block of elements at a time: `isfinite` of a float tensor makes an `abs` copy
    and a mask as large as it, which at the end of a run over a 151,936-token vocabulary was the run's peak."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[s:s + block]).all()) for s in range(0, flat.numel(), block))


def require_finite(model: torch.nn.Module, what: str, env: DistEnv = DistEnv()) -> None:
    """Refuse to save weights that are NaN or infinite: such a model would load and then produce garbage.

    Under FSDP each rank sees only its shards, so the ranks add up their findings: all of them stop, or none
    (one rank leaving alone would leave the others waiting in the next collective).
    """
    named = list(model.named_parameters())
    local = [fsdp.local_part(p.detach()) for _, p in named]
    flags = torch.tensor([not _all_finite(t) for t in local], dtype=torch.float32)
    if any(fsdp.is_sharded(p) for _, p in named):
        flags = all_reduce_sum(flags, env)
    bad = [name for (name, _), flag in zip(named, flags.tolist()) if flag]
    if bad:
        raise NonFiniteError(f"{what}: {len(bad)} weight tensors hold NaN or infinite values (first: {bad[0]}); "
                             f"not saved. Lower --lr or resume from an earlier checkpoint")
