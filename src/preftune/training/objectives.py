"""The objectives of SFT and DPO, and the stage's objective for a run (`make_objective`).

What an objective returns for one micro-batch: contribution.py.

The loop divides by the units of the whole step (all micro-batches, all ranks), so gradient accumulation and
data parallelism give the same gradient as one big batch.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..data.batching import PromptAnswerBatch
from ..dist.env import DistEnv, all_reduce_sum
from ..logps.layouts import AnswerLogps
from ..losses import parse_loss_spec, preference_loss
from .contribution import Contribution, StatelessObjective, with_router_loss
from .kto_objective import KTOObjective
from .reward_objective import RewardObjective


class SFTObjective(StatelessObjective):
    """Mean negative log-likelihood per answer token."""

    # The metrics key of throughput: examples (batch rows) per second. The loss itself is per token (`units`).
    throughput_key = "samples_per_s"

    def __init__(self, router_aux_coef: float = 0.0):
        self.router_aux_coef = router_aux_coef

    def units(self, batch: PromptAnswerBatch) -> float:
        """What the step's summed loss is divided by: the answer tokens in the loss (the mask's, for multi-turn)."""
        return batch.answer_tokens()

    def __call__(self, policy: AnswerLogps, batch: PromptAnswerBatch, ref_logps=None) -> Contribution:
        loss = -policy.logps.sum()
        return with_router_loss(Contribution(loss, {"loss": loss.detach()}), policy, self.router_aux_coef,
                                self.units(batch))


class PreferenceObjective:
    """A preference loss (or a weighted mix) over pairs, plus the optional RPO NLL term on chosen answers."""

    throughput_key = "pairs_per_s"

    def units(self, batch: PromptAnswerBatch) -> float:
        """What the step's summed loss is divided by: pairs."""
        return float(batch.size)

    def __init__(self, cfg: TrainConfig, env: DistEnv = DistEnv(), router_aux_coef: float = 0.0):
        self.cfg = cfg
        self.env = env
        self.router_aux_coef = router_aux_coef
        self.tracks_shift = any(name == "bco_pair" for name, _ in parse_loss_spec(cfg.loss))
        # Running mean of batch rewards, the shift `delta` of BCO (the paper's; earlier TRL releases kept it, TRL 1.16
        # has none); part of the state so a resumed run matches. Each batch's mean is taken over all ranks, so every
        # rank keeps the same running mean.
        self.reward_sum = 0.0
        self.reward_count = 0

    @property
    def bco_delta(self) -> float:
        return self.reward_sum / self.reward_count if self.reward_count else 0.0

    def __call__(self, policy: AnswerLogps, batch: PromptAnswerBatch, ref_logps=None) -> Contribution:
        cfg = self.cfg
        pc, pr = policy.logps[0::2], policy.logps[1::2]
        len_c, len_r = policy.lengths[0::2].float(), policy.lengths[1::2].float()
        rc = rr = None
        if ref_logps is not None:
            rc, rr = ref_logps[0::2], ref_logps[1::2]
        if self.tracks_shift:  # BCO's delta: running mean of per-batch mean rewards, this batch included
            rewards = cfg.beta * torch.cat([pc - rc, pr - rr]).detach().double()
            total = all_reduce_sum(torch.stack([rewards.sum(), rewards.new_tensor(rewards.numel())]), self.env)
            self.reward_sum += float(total[0] / total[1])
            self.reward_count += 1
        losses, chosen_r, rejected_r = self.pair_losses(pc, pr, rc, rr, len_c, len_r)
        sums = {
            "loss": losses.detach().sum(),
            "reward_accuracy": (chosen_r > rejected_r).float().sum(),
            "reward_margin": (chosen_r - rejected_r).sum(),
            "chosen_reward": chosen_r.sum(),
            "rejected_reward": rejected_r.sum(),
            "chosen_logp": pc.detach().sum(),
            "rejected_logp": pr.detach().sum(),
        }
        return with_router_loss(Contribution(losses.sum(), sums), policy, self.router_aux_coef, self.units(batch))

    def pair_losses(self, pc, pr, rc, rr, len_c, len_r):
        """(per-pair losses, chosen rewards, rejected rewards) of the training objective with the current BCO
        shift, which this leaves as it is (evaluation computes its loss here too)."""
        cfg = self.cfg
        # The NLL per chosen token of the batch, as each pair's share of it: TRL's "sft" term and ORPO's NLL.
        nll_share = -pc * (len(pc) / len_c.sum())
        losses, chosen_r, rejected_r = preference_loss(
            pc, pr, rc, rr, loss_type=cfg.loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
            chosen_lengths=len_c, rejected_lengths=len_r, simpo_gamma=cfg.simpo_gamma, bco_delta=self.bco_delta,
            chosen_nll=nll_share)
        if cfg.sft_weight:
            losses = losses + cfg.sft_weight * nll_share
        return losses, chosen_r, rejected_r

    def finish(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {k: v / count for k, v in sums.items()}

    def state_dict(self) -> dict:
        return {"reward_sum": self.reward_sum, "reward_count": self.reward_count}

    def load_state_dict(self, state: dict) -> None:
        self.reward_sum, self.reward_count = state["reward_sum"], state["reward_count"]


def make_objective(cfg: TrainConfig, env: DistEnv = DistEnv(), router_aux_coef: float = 0.0,
                   margins: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)):
    """The stage's objective; `router_aux_coef` weighs the policy's router loss (see `with_router_loss`);
    `margins`: the reward-model margins of the training and held-out records (see `RewardObjective`)."""
    if cfg.stage == "sft":
        return SFTObjective(router_aux_coef)
    if cfg.stage == "kto":
        return KTOObjective(cfg, env, router_aux_coef)
    if cfg.stage == "rm":
        return RewardObjective(cfg, *margins)
    return PreferenceObjective(cfg, env, router_aux_coef)
