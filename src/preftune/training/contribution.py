"""What one micro-batch contributes to a step: a summed loss and summed metrics, over units the objective counts.

The loop divides by the units of the whole step (all micro-batches, all ranks), so gradient accumulation and
data parallelism give the same gradient as one big batch. Every objective (objectives.py, kto_objective.py,
reward_objective.py) returns a `Contribution`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..logps.layouts import AnswerLogps


@dataclass
class Contribution:
    loss_sum: torch.Tensor  # scalar, differentiable: a sum over the micro-batch's units (see `units`)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # detached metric sums over the same units


def with_router_loss(c: Contribution, policy: AnswerLogps, coef: float, units: float) -> Contribution:
    """`c` plus `coef` times the micro-batch's router load-balancing loss (mixture of experts), logged as `aux_loss`.

    The router loss is a mean over the micro-batch's tokens; it enters the summed loss times the micro-batch's
    units, so once the step divides by all its units the step adds `coef` times the units-weighted mean of its
    micro-batches' router losses (exactly `coef * aux_loss` for a step of one micro-batch, as in TRL).
    """
    if policy.aux_loss is None or not coef:
        return c
    aux = policy.aux_loss * units
    sums = {**c.sums, "loss": c.sums["loss"] + coef * aux.detach(), "aux_loss": aux.detach()}
    return Contribution(c.loss_sum + coef * aux, sums)


class StatelessObjective:
    """The parts every objective without state between steps shares: metrics are sums over the step's units, and
    a checkpoint holds nothing of the objective."""

    def finish(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {k: v / count for k, v in sums.items()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
