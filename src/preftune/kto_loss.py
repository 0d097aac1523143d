"""The KTO loss (Kahneman-Tversky Optimization, Ethayarajh et al. 2024): pure functions of log-prob tensors.

KTO learns from unpaired feedback: each example is one answer rated desirable or undesirable. With

    r   = log π(y|x) - log π_ref(y|x)                the example's log-ratio (nats)
    z   = max(0, mean over the batch of log π(y'|x) - log π_ref(y'|x))
                                                     the KL estimate, from mismatched pairs (x, y')
    v   = 1 - σ(β (r - z))   for a desirable answer, weighted by λ_D (`desirable_weight`)
    v   = 1 - σ(β (z - r))   for an undesirable one, weighted by λ_U (`undesirable_weight`)

the loss is the mean of λ·v over the batch. The KL estimate is detached (no gradient flows through it), averaged
over data-parallel ranks (each rank's batch mean counts once), then clamped at zero, as TRL 1.16's KTOTrainer
computes it; the mismatched pairs are each prompt with the previous example's answer within its batch.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

# Eq. (8) of the paper: λ_D n_D / (λ_U n_U) should lie in [1, 4/3].
BALANCE_RANGE = (1.0, 4.0 / 3.0)


def kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor, rank_mean=lambda t: t) -> Tensor:
    """The detached KL estimate z, a scalar: the batch mean of the mismatched pairs' log-ratios [B], averaged over
    ranks by `rank_mean` (identity on one process), clamped at zero."""
    local = (policy_kl_logps - ref_kl_logps).mean().detach()
    return rank_mean(local).clamp(min=0)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl: Tensor, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """(per-example weighted losses [B], rewards β·r [B] detached).

    policy_logps, ref_logps: [B] summed answer log-probs (nats); labels: [B] bool, True = desirable;
    kl: the scalar from `kl_estimate`. The caller takes the mean of the losses.
    """
    logratios = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(labels.to(torch.bool), desirable, undesirable)
    return losses, beta * logratios.detach()


def imbalance_advice(n_desirable: int, n_undesirable: int, desirable_weight: float,
                     undesirable_weight: float) -> str | None:
    """One line of the paper's advice when λ_D n_D / (λ_U n_U) lies outside [1, 4/3], or when one class is
    missing (no weight can balance that, and all-one-label data is more often a misread label); None when
    inside."""
    if not n_desirable or not n_undesirable:
        if not n_desirable and not n_undesirable:
            return None
        have, lack = ("desirable", "undesirable") if n_desirable else ("undesirable", "desirable")
        return (f"kto: all {n_desirable + n_undesirable} examples are {have} and none {lack}: the loss only "
                f"pushes those answers {'up' if n_desirable else 'down'} against the KL baseline; check the "
                f"data's labels (`preftune data show`)")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    low, high = BALANCE_RANGE
    if low <= ratio <= high:
        return None
    d_low = undesirable_weight * n_undesirable / n_desirable
    u_high = desirable_weight * n_desirable / n_undesirable
    return (f"kto: {n_desirable} desirable and {n_undesirable} undesirable examples give desirable_weight*"
            f"n_desirable / (undesirable_weight*n_undesirable) = {ratio:.3g}, outside the [1, 4/3] the KTO paper "
            f"advises (Ethayarajh et al. 2024, eq. 8); set either --desirable-weight in [{d_low:.3g}, "
            f"{d_low * high:.3g}] or --undesirable-weight in [{u_high / high:.3g}, {u_high:.3g}]")
