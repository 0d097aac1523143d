"""Preference metrics: does the model now prefer what the data prefers, and how far has it moved?"""

from __future__ import annotations

import torch

from .config import TrainConfig
from .data.batching import collate
from .logps.answer import answer_logps


@torch.no_grad()
def table_of(logps_fn, items, *, pad_id: int, device, batch_size: int) -> torch.Tensor:
    """[N, k] summed answer log-probs of tokenised items (pairs: k=2, chosen then rejected), in order;
    `logps_fn(batch)` gives a batch's [B*k] log-probs (a model's, or a reference strategy's)."""
    rows = []
    for s in range(0, len(items), batch_size):
        batch = collate(items[s:s + batch_size], pad_id).to(device)
        rows.append(logps_fn(batch).float().cpu().view(batch.size, batch.k))
    return torch.cat(rows) if rows else torch.zeros(0, 2)


def logps_table(model, items, *, pad_id: int, device, batch_size: int = 8, prefix_sharing: bool = True,
                chunk_size: int = 1024, trim_padding: bool = True, packing: bool = True) -> torch.Tensor:
    """`table_of` for a model, in eval mode (no dropout) for the duration."""
    was_training = model.training
    model.eval()
    try:
        def logps(batch):
            return answer_logps(model, batch, prefix_sharing=prefix_sharing, chunk_size=chunk_size,
                                trim_padding=trim_padding, packing=packing).logps

        return table_of(logps, items, pad_id=pad_id, device=device, batch_size=batch_size)
    finally:
        model.train(was_training)


def preference_metrics(policy: torch.Tensor, ref: torch.Tensor | None, beta: float) -> dict[str, float]:
    """Summary of [N, 2] policy (and reference) log-probs.

    Rewards are beta * (log pi - log pi_ref); without a reference they are beta * log pi.
    `logratio_chosen` is the mean log pi - log pi_ref on chosen answers: how far the policy moved.
    """
    base = ref if ref is not None else torch.zeros_like(policy)
    rewards = beta * (policy - base)
    margin = rewards[:, 0] - rewards[:, 1]
    out = {
        "pairs": int(policy.shape[0]),
        "reward_accuracy": float((margin > 0).float().mean()),
        "reward_margin": float(margin.mean()),
        "chosen_reward": float(rewards[:, 0].mean()),
        "rejected_reward": float(rewards[:, 1].mean()),
        "chosen_logp": float(policy[:, 0].mean()),
        "rejected_logp": float(policy[:, 1].mean()),
    }
    if ref is not None:
        out["logratio_chosen"] = float((policy[:, 0] - ref[:, 0]).mean())
        out["logratio_rejected"] = float((policy[:, 1] - ref[:, 1]).mean())
        out["ref_chosen_logp"] = float(ref[:, 0].mean())
        out["ref_rejected_logp"] = float(ref[:, 1].mean())
    return out


def per_pair_rows(policy: torch.Tensor, ref: torch.Tensor | None, items) -> list[dict]:
    rows = []
    for i, item in enumerate(items):
        rows.append({
            "index": item.index,
            "policy_chosen_logp": float(policy[i, 0]),
            "policy_rejected_logp": float(policy[i, 1]),
            "ref_chosen_logp": None if ref is None else float(ref[i, 0]),
            "ref_rejected_logp": None if ref is None else float(ref[i, 1]),
            "chosen_tokens": len(item.chosen_ids),
            "rejected_tokens": len(item.rejected_ids),
        })
    return rows


def evaluate_during(model, reference_table, eval_items, cfg: TrainConfig, pad_id: int, device, objective) -> dict:
    """Held-out metrics during training, keys prefixed `eval_`: token NLL for SFT; for DPO the preference
    metrics and the loss, against the reference log-probs computed once before training. The loss is
    `objective`'s (BCO's running shift and the RPO term included), so eval_loss and loss measure the same thing.
    A reward model's objective evaluates itself (rewards, not log-probs)."""
    if cfg.stage == "rm":
        metrics = objective.evaluate(model, eval_items, pad_id=pad_id, device=device, batch_size=cfg.batch_size)
        return {f"eval_{k}": v for k, v in metrics.items()}
    policy = logps_table(model, eval_items, pad_id=pad_id, device=device, batch_size=cfg.batch_size,
                         prefix_sharing=cfg.prefix_sharing, chunk_size=cfg.logits_chunk_size,
                         trim_padding=cfg.trim_padding, packing=cfg.packing)
    if cfg.stage == "sft":
        tokens = sum(len(it.answer_ids) for it in eval_items)
        return {"eval_loss": float(-policy.sum() / max(tokens, 1))}
    if hasattr(objective, "evaluate"):  # an objective with its own held-out metrics (KTO)
        return {f"eval_{k}": v for k, v in objective.evaluate(policy, reference_table, eval_items).items()}
    metrics = preference_metrics(policy, reference_table, cfg.beta)
    lengths = torch.tensor([[len(it.chosen_ids), len(it.rejected_ids)] for it in eval_items], dtype=torch.float32)
    ref = (None, None) if reference_table is None else (reference_table[:, 0], reference_table[:, 1])
    losses, _, _ = objective.pair_losses(policy[:, 0], policy[:, 1], *ref, lengths[:, 0], lengths[:, 1])
    metrics["loss"] = float(losses.mean())
    return {f"eval_{k}": v for k, v in metrics.items()}
