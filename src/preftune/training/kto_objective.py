"""KTO's objective: unpaired examples, each rated desirable or undesirable, with the in-batch KL estimate."""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..data.batching import PromptAnswerBatch
from ..dist.env import DistEnv, all_reduce_sum
from ..kto_loss import kl_estimate, kto_loss
from ..logps.layouts import AnswerLogps
from .contribution import Contribution, StatelessObjective, with_router_loss


class KTOObjective(StatelessObjective):
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
