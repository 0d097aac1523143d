"""A reward model's objective: Bradley-Terry on pairs, with per-pair margins and reward centering."""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..data.batching import PromptAnswerBatch
from ..reward import rewards_table
from .contribution import Contribution, StatelessObjective


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


class RewardObjective(StatelessObjective):
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


def _reward_sums(losses, chosen, rejected) -> dict[str, torch.Tensor]:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"loss": losses.detach().sum(), "reward_accuracy": (chosen > rejected).float().sum(),
            "reward_margin": (chosen - rejected).sum(), "chosen_reward": chosen.sum(),
            "rejected_reward": rejected.sum()}
