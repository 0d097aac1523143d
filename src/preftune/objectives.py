"""What one micro-batch contributes to a step: a summed loss, summed metrics and the count they are sums over.

The loop divides by the count over the whole step (all micro-batches, all ranks), so gradient accumulation and
data parallelism give the same gradient as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import TrainConfig
from .data.batching import PromptAnswerBatch
from .logprobs import AnswerLogps
from .losses import needs_reference, preference_loss


@dataclass
class Contribution:
    loss_sum: torch.Tensor                  # scalar, differentiable
    count: float                            # pairs (DPO) or answer tokens (SFT)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # detached metric sums over `count` units


class SFTObjective:
    """Mean negative log-likelihood per answer token."""

    unit = "samples"

    def units(self, batch: PromptAnswerBatch) -> float:
        return batch.answer_tokens()

    def __call__(self, policy: AnswerLogps, batch: PromptAnswerBatch, ref_logps=None) -> Contribution:
        tokens = batch.answer_tokens()
        loss = -policy.logps.sum()
        return Contribution(loss, tokens, {"loss": loss.detach()})

    def finish(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {k: v / count for k, v in sums.items()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PreferenceObjective:
    """A preference loss (or a weighted mix) over pairs, plus the optional RPO NLL term on chosen answers."""

    unit = "pairs"

    def units(self, batch: PromptAnswerBatch) -> float:
        return float(batch.size)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.uses_reference = needs_reference(cfg.loss)
        # Running mean of batch rewards, the shift `delta` of BCO (as TRL keeps it); part of the state so a resumed run matches.
        self.reward_sum = 0.0
        self.reward_count = 0

    def __call__(self, policy: AnswerLogps, batch: PromptAnswerBatch, ref_logps=None) -> Contribution:
        cfg = self.cfg
        pc, pr = policy.logps[0::2], policy.logps[1::2]
        lc, lr = policy.lengths[0::2].float(), policy.lengths[1::2].float()
        rc = rr = None
        if ref_logps is not None:
            rc, rr = ref_logps[0::2], ref_logps[1::2]
        if rc is not None:  # BCO's delta: running mean of per-batch mean rewards, this batch included
            batch_rewards = cfg.beta * torch.cat([pc - rc, pr - rr]).detach()
            self.reward_sum += float(batch_rewards.mean())
            self.reward_count += 1
        delta = self.reward_sum / self.reward_count if self.reward_count else 0.0
        losses, chosen_r, rejected_r = preference_loss(
            pc, pr, rc, rr, loss_type=cfg.loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
            chosen_lengths=lc, rejected_lengths=lr, simpo_gamma=cfg.simpo_gamma, bco_delta=delta)
        if cfg.sft_weight:
            losses = losses + cfg.sft_weight * (-pc / lc)
        n = pc.shape[0]
        sums = {
            "loss": losses.detach().sum(),
            "reward_accuracy": (chosen_r > rejected_r).float().sum(),
            "reward_margin": (chosen_r - rejected_r).sum(),
            "chosen_reward": chosen_r.sum(),
            "rejected_reward": rejected_r.sum(),
            "chosen_logp": pc.detach().sum(),
            "rejected_logp": pr.detach().sum(),
        }
        return Contribution(losses.sum(), float(n), sums)

    def finish(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {k: v / count for k, v in sums.items()}

    def state_dict(self) -> dict:
        return {"reward_sum": self.reward_sum, "reward_count": self.reward_count}

    def load_state_dict(self, state: dict) -> None:
        self.reward_sum, self.reward_count = state["reward_sum"], state["reward_count"]


def make_objective(cfg: TrainConfig):
    return SFTObjective() if cfg.stage == "sft" else PreferenceObjective(cfg)
