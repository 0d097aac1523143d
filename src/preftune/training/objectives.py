"""What one micro-batch contributes to a step: a summed loss and summed metrics, over units the objective counts.

The loop divides by the units of the whole step (all micro-batches, all ranks), so gradient accumulation and
data parallelism give the same gradient as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..data.batching import PromptAnswerBatch
from ..dist.env import DistEnv, all_reduce_sum
from ..logps.layouts import AnswerLogps
from ..kto_loss import kl_estimate, kto_loss
from ..losses import parse_loss_spec, preference_loss
from ..reward import rewards_table


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


class SFTObjective:
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

    def finish(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {k: v / count for k, v in sums.items()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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
        losses, chosen_r, rejected_r = preference_loss(
            pc, pr, rc, rr, loss_type=cfg.loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
            chosen_lengths=len_c, rejected_lengths=len_r, simpo_gamma=cfg.simpo_gamma, bco_delta=self.bco_delta)
        if cfg.sft_weight:
            losses = losses + cfg.sft_weight * (-pc / len_c)
        return losses, chosen_r, rejected_r

    def finish(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {k: v / count for k, v in sums.items()}

    def state_dict(self) -> dict:
        return {"reward_sum": self.reward_sum, "reward_count": self.reward_count}

    def load_state_dict(self, state: dict) -> None:
        self.reward_sum, self.reward_count = state["reward_sum"], state["reward_count"]


class KTOObjective:
    """The KTO loss (kto_loss.py) over unpaired examples. A batch holds k=2 answers a prompt: the rated answer,
    then the mismatched answer whose log-ratio estimates the KL term; `batch.labels` says which are desirable.

    The KL estimate is taken per micro-batch (its mean over ranks, as TRL takes it per device batch); the loss is a
    mean over examples. Metrics: loss, kl, and the mean reward and log-prob of desirable and undesirable answers."""

    throughput_key = "samples_per_s"

    def __init__(self, cfg: TrainConfig, env: DistEnv = DistEnv(), router_aux_coef: float = 0.0):
        self.cfg = cfg
        self.env = env
        self.router_aux_coef = router_aux_coef

    def units(self, batch: PromptAnswerBatch) -> float:
        """What the step's summed loss is divided by: examples."""
        return float(batch.size)

    def _rank_mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.env.enabled:
            return value
        return (all_reduce_sum(value.double(), self.env) / self.env.world_size).to(value.dtype)

    def __call__(self, policy: AnswerLogps, batch: PromptAnswerBatch, ref_logps=None) -> Contribution:
        own, kl_policy = policy.logps[0::2], policy.logps[1::2]
        ref_own, ref_kl = ref_logps[0::2], ref_logps[1::2]
        kl = kl_estimate(kl_policy, ref_kl, self._rank_mean)
        losses, rewards = self.losses(own, ref_own, batch.labels, kl)
        sums = {"loss": losses.detach().sum(), "kl": kl * batch.size,
                **self._class_sums(batch.labels, rewards, own.detach())}
        return with_router_loss(Contribution(losses.sum(), sums), policy, self.router_aux_coef, self.units(batch))

    def losses(self, own, ref_own, labels, kl):
        cfg = self.cfg
        return kto_loss(own, ref_own, labels, kl, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                        undesirable_weight=cfg.undesirable_weight)

    @staticmethod
    def _class_sums(labels: torch.Tensor, rewards: torch.Tensor, logps: torch.Tensor) -> dict[str, torch.Tensor]:
        good = labels.to(torch.bool)
        out = {}
        for name, mask in (("desirable", good), ("undesirable", ~good)):
            out[f"n_{name}"] = mask.sum().double()
            out[f"{name}_reward"] = rewards[mask].sum()
            out[f"{name}_logp"] = logps[mask].sum()
        return out

    def finish(self, sums: dict[str, float], count: float) -> dict[str, float]:
        out = {k: v / count for k, v in sums.items() if not k.startswith(("n_", "desirable_", "undesirable_"))}
        for name in ("desirable", "undesirable"):
            n = sums.get(f"n_{name}", 0.0)
            if n:  # a class absent from the step has no mean (as in TRL)
                out[f"{name}_reward"] = sums[f"{name}_reward"] / n
                out[f"{name}_logp"] = sums[f"{name}_logp"] / n
        if "desirable_reward" in out and "undesirable_reward" in out:
            out["reward_margin"] = out["desirable_reward"] - out["undesirable_reward"]
        return out

    def evaluate(self, policy: torch.Tensor, ref: torch.Tensor, items) -> dict[str, float]:
        """Held-out metrics from [N, 2] policy and reference log-probs of tokenised KTO items, in batches of
        `batch_size` in order (each batch its own KL estimate, as in training); keys as in training."""
        labels = torch.tensor([it.label for it in items])
        sums: dict[str, float] = {}
        size = self.cfg.batch_size
        for s in range(0, len(items), size):
            p, r, lab = policy[s:s + size], ref[s:s + size], labels[s:s + size]
            kl = kl_estimate(p[:, 1], r[:, 1])
            losses, rewards = self.losses(p[:, 0], r[:, 0], lab, kl)
            part = {"loss": losses.sum(), "kl": kl * len(lab), **self._class_sums(lab, rewards, p[:, 0])}
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return self.finish(sums, float(len(items)))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def reward_model_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                        center_coef: float = 0.0) -> torch.Tensor:
    """[B] Bradley-Terry losses of a reward model: -log sigmoid(r_c - r_r - margin) + coef * (r_c + r_r)^2.

    chosen, rejected, margin: [B] rewards and the records' margins (None: zero). Their mean over a batch is TRL
    RewardTrainer's loss: its centering term is coef * mean((r_c + r_r)^2) over the same pairs."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    losses = -torch.nn.functional.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    return losses


class RewardObjective:
    """A reward model on pairs (Bradley-Terry): the loss of `reward_model_losses`, per pair.

    `margins`, `eval_margins`: [N] the margins of the training and held-out records by dataset position (None
    when no record has one). The model's output for a batch is its [2B] rewards, chosen and rejected in turn."""

    throughput_key = "pairs_per_s"

    def __init__(self, cfg: TrainConfig, margins: torch.Tensor | None = None,
                 eval_margins: torch.Tensor | None = None):
        self.center = cfg.center_rewards
        self.margins, self.eval_margins = margins, eval_margins

    def units(self, batch: PromptAnswerBatch) -> float:
        return float(batch.size)

    def __call__(self, rewards: torch.Tensor, batch: PromptAnswerBatch, ref_logps=None) -> Contribution:
        margin = None if self.margins is None else self.margins[batch.index].to(rewards.device)
        chosen, rejected = rewards[0::2], rewards[1::2]
        losses = reward_model_losses(chosen, rejected, margin, self.center)
        return Contribution(losses.sum(), _reward_sums(losses, chosen, rejected))

    @torch.no_grad()
    def evaluate(self, model, items, *, pad_id: int, device, batch_size: int) -> dict[str, float]:
        """Loss, accuracy and mean margin of the held-out pairs `items` (keys as in training)."""
        table = rewards_table(model, items, pad_id=pad_id, device=device, batch_size=batch_size)
        margin = None
        if self.eval_margins is not None:
            margin = self.eval_margins[torch.tensor([it.index for it in items], dtype=torch.long)]
        losses = reward_model_losses(table[:, 0], table[:, 1], margin, self.center)
        sums = _reward_sums(losses, table[:, 0], table[:, 1])
        return {k: float(v) / len(items) for k, v in sums.items()}

    def finish(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {k: v / count for k, v in sums.items()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _reward_sums(losses, chosen, rejected) -> dict[str, torch.Tensor]:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"loss": losses.detach().sum(), "reward_accuracy": (chosen > rejected).float().sum(),
            "reward_margin": (chosen - rejected).sum(), "chosen_reward": chosen.sum(),
            "rejected_reward": rejected.sum()}


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
