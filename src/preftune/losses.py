"""Preference losses: pure functions of per-answer log-probs, chosen by name from a registry.

Every loss sees one batch of preference pairs as a `Pairs` bundle. Its tensors all have shape `[batch]`:
summed log-probs (nats) of the answer tokens under the policy and, for reference-based losses, under the
frozen reference; plus the number of answer tokens when a loss works on per-token averages. Each loss returns
the per-pair loss, shape `[batch]`; the caller takes the mean.

Names and formulas follow TRL 1.16's `loss_type` values so that numbers compare (TRL 1.16 ignores
label_smoothing for `sigmoid`; here it gives conservative DPO, as the DPO authors' code does. TRL 1.16's
`bco_pair` has no reward shift, our bco_delta = 0; the trainer here keeps the BCO paper's running mean, as
earlier TRL releases did).
Notation in the docstrings:

    a = log π(y_w|x) - log π_ref(y_w|x)     chosen log-ratio      (nats)
    b = log π(y_l|x) - log π_ref(y_l|x)     rejected log-ratio    (nats)
    h = a - b                               the DPO margin        (nats)
    σ = logistic sigmoid, β = `beta`, ε = `label_smoothing`

`--loss` may mix losses, "sigmoid:0.8,bco_pair:0.2": the per-pair loss is the weighted sum of the parts.
The training loop calls `preference_loss` and never looks at a loss name; `needs_reference` tells it whether
to load a reference model at all.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError

Tensor = torch.Tensor


@dataclass(frozen=True)
class Pairs:
    """One batch of preference pairs as a loss sees it. Tensors are `[batch]`; log-probs are summed, in nats.

    `ref_*` are None for reference-free losses; `*_lengths` (answer tokens, at least 1) are None unless a loss
    needs them. `chosen_nll` is the policy's mean per-token NLL of the chosen answer (ORPO's SFT term).
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    chosen_nll: Tensor | None
    beta: float
    label_smoothing: float
    simpo_gamma: float
    bco_delta: float | Tensor
    discopop_tau: float

    @property
    def chosen_logratio(self) -> Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratio(self) -> Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> Tensor:
        return self.chosen_logratio - self.rejected_logratio

    @property
    def policy_chosen_mean(self) -> Tensor:
        return self.policy_chosen / self.chosen_lengths

    @property
    def policy_rejected_mean(self) -> Tensor:
        return self.policy_rejected / self.rejected_lengths


LossFn = Callable[[Pairs], Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function, what inputs it needs, and where it comes from."""

    fn: LossFn
    needs_reference: bool
    needs_lengths: bool
    paper: str
    description: str
    reads: tuple[str, ...] = ()  # the config fields it reads besides beta (a field no loss of a run reads is refused)


# ---------------------------------------------------------------------------------------------------- helpers
def _smoothed_logistic(logits: Tensor, eps: float) -> Tensor:
    """-(1-ε)·log σ(z) - ε·log σ(-z): a logistic loss that believes a fraction ε of labels are flipped."""
    loss = -F.logsigmoid(logits)
    if eps:
        loss = (1 - eps) * loss - eps * F.logsigmoid(-logits)
    return loss


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Mächler 2012).

    Near 0, 1 - exp(x) cancels; there `log(-expm1(x))` keeps the digits. Far below 0, exp(x) underflows
    in expm1's result; there `log1p(-exp(x))` does. x is clamped just below 0 so that a certain answer
    (log-prob 0) gives a large finite value, not -inf.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ---------------------------------------------------------------------------------------------------- losses
def sigmoid_loss(p: Pairs) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): -log σ(β·h). Shape [batch], nats.

    With ε = label_smoothing > 0 this is conservative DPO (Mitchell 2023), for labels flipped at rate ε:
    -(1-ε)·log σ(β·h) - ε·log σ(-β·h).
    """
    return _smoothed_logistic(p.beta * p.margin, p.label_smoothing)


def robust_loss(p: Pairs) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), ε = label_smoothing the assumed flip rate, ε < 1/2:
    [(1-ε)·(-log σ(β·h)) - ε·(-log σ(-β·h))] / (1 - 2ε). An unbiased estimate of the clean-label DPO loss,
    so single pairs may go negative. Shape [batch], nats.
    """
    eps = p.label_smoothing
    clean, flipped = -F.logsigmoid(p.beta * p.margin), -F.logsigmoid(-p.beta * p.margin)
    return ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)


def ipo_loss(p: Pairs) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): (h̄ - 1/(2β))², where h̄ is the margin of per-token *mean* log-ratios,
    h̄ = a/len_w - b/len_l. The length normalisation is TRL's (agreed with the IPO authors): with summed
    log-probs the squared loss would grow with answer length. Shape [batch], nats².
    """
    margin = p.chosen_logratio / p.chosen_lengths - p.rejected_logratio / p.rejected_lengths
    return (margin - 1 / (2 * p.beta)) ** 2


def hinge_loss(p: Pairs) -> Tensor:
    """SLiC hinge loss (Zhao et al. 2023, with the reference log-ratio): max(0, 1 - β·h). Shape [batch]."""
    return torch.relu(1 - p.beta * p.margin)


def bco_pair_loss(p: Pairs) -> Tensor:
    """Paired BCO (Jung et al. 2024): -log σ(r_w - δ) - log σ(-(r_l - δ)), with rewards r = β·log-ratio and
    δ = bco_delta, a running mean of rewards the trainer keeps (reward units, no gradient). Shape [batch], nats.
    """
    delta = p.bco_delta.detach() if isinstance(p.bco_delta, Tensor) else p.bco_delta
    chosen, rejected = p.beta * p.chosen_logratio - delta, p.beta * p.rejected_logratio - delta
    return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)


def sppo_hard_loss(p: Pairs) -> Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, eq. 4.7 with P = 1 for the winner, 0 for the loser):
    (a - 1/(2β))² + (b + 1/(2β))². Shape [batch], nats².
    """
    half = 1 / (2 * p.beta)
    return (p.chosen_logratio - half) ** 2 + (p.rejected_logratio + half) ** 2


def nca_pair_loss(p: Pairs) -> Tensor:
    """Paired NCA (Chen et al. 2024, K = 2): -log σ(r_w) - ½·log σ(-r_w) - ½·log σ(-r_l), r = β·log-ratio.
    Unlike DPO it pins the absolute chosen reward, not just the margin. Shape [batch], nats.
    """
    chosen, rejected = p.beta * p.chosen_logratio, p.beta * p.rejected_logratio
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def apo_zero_loss(p: Pairs) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): (1 - σ(β·a)) + σ(β·b). Raises the chosen likelihood and
    lowers the rejected one; for answers better than the model's own. Shape [batch], in [0, 2].
    """
    return 1 - torch.sigmoid(p.beta * p.chosen_logratio) + torch.sigmoid(p.beta * p.rejected_logratio)


def apo_down_loss(p: Pairs) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): σ(β·a) + (1 - σ(β·h)). Lowers both likelihoods, the rejected
    one more; for chosen answers worse than the model's own. Shape [batch], in [0, 2].
    """
    return torch.sigmoid(p.beta * p.chosen_logratio) + 1 - torch.sigmoid(p.beta * p.margin)


def exo_pair_loss(p: Pairs) -> Tensor:
    """Paired EXO (Ji et al. 2024, eq. 16): KL(q ‖ p_ε) between the model's two-way preference q = σ(±β·h)
    and the smoothed label p_ε = (1-ε, ε):  σ(β·h)·[log σ(β·h) - log(1-ε)] + σ(-β·h)·[log σ(-β·h) - log ε].
    ε = label_smoothing; the label must not be exactly 0/1, so ε = 0 means the paper's 1e-3 (earlier TRL
    substituted the same; TRL 1.16 refuses 0). Shape [batch], nats.
    """
    eps = p.label_smoothing or 1e-3
    z = p.beta * p.margin
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def discopop_loss(p: Pairs) -> Tensor:
    """DiscoPOP, "log-ratio modulated loss" (Chris Lu et al. 2024, eq. 5), z = β·h, τ = discopop_tau (0.05):
    (1 - m)·(-log σ(z)) + m·exp(-z), with mixing weight m = σ(z/τ). Shape [batch], nats.

    m·exp(-z) is evaluated as exp(log σ(z/τ) - z), the same number without exp(-z) overflowing when z << 0.
    """
    z = p.beta * p.margin
    mix = torch.sigmoid(z / p.discopop_tau)
    return (1 - mix) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / p.discopop_tau) - z)


def sigmoid_norm_loss(p: Pairs) -> Tensor:
    """Length-normalised DPO: -log σ(β·h̄), h̄ = a/len_w - b/len_l the margin of per-token mean log-ratios (TRL's
    `sigmoid_norm`). label_smoothing smooths it as it does `sigmoid`. Shape [batch], nats."""
    margin = p.chosen_logratio / p.chosen_lengths - p.rejected_logratio / p.rejected_lengths
    return _smoothed_logistic(p.beta * margin, p.label_smoothing)


def aot_loss(p: Pairs) -> Tensor:
    """AOT, paired (Melnyk et al. 2024): the batch's policy margins log π(y_w) - log π(y_l) and reference margins,
    each sorted, matched by rank: -(1-ε)·log σ(β·d_i) - ε·log σ(-β·d_i), d_i = i-th smallest policy margin minus
    i-th smallest reference margin. A loss of the batch's distributions: element i belongs to a rank, not to
    pair i (the mean is what counts). Shape [batch], nats."""
    ranked = torch.sort(p.policy_chosen - p.policy_rejected).values - torch.sort(p.ref_chosen - p.ref_rejected).values
    return _smoothed_logistic(p.beta * ranked, p.label_smoothing)


def aot_unpaired_loss(p: Pairs) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024): the batch's chosen and rejected log-ratios, each sorted, matched by
    rank: d_i = i-th smallest a minus i-th smallest b, then as `aot`. Shape [batch], nats."""
    ranked = torch.sort(p.chosen_logratio).values - torch.sort(p.rejected_logratio).values
    return _smoothed_logistic(p.beta * ranked, p.label_smoothing)


def simpo_loss(p: Pairs) -> Tensor:
    """SimPO (Meng et al. 2024): -log σ(β·(logπ(y_w)/len_w - logπ(y_l)/len_l) - γ), γ = simpo_gamma.
    Reference-free; uses per-token mean log-probs. label_smoothing ε > 0 smooths it as conservative DPO (as
    TRL's CPO trainer does). Shape [batch], nats.
    """
    logits = p.beta * (p.policy_chosen_mean - p.policy_rejected_mean) - p.simpo_gamma
    return _smoothed_logistic(logits, p.label_smoothing)


def orpo_loss(p: Pairs) -> Tensor:
    """ORPO (Hong et al. 2024, eqs. 4 and 7): NLL_w - β·log σ(log odds ratio). Reference-free. Shape [batch], nats.

    With m = mean per-token log-prob of an answer, odds(y) = p/(1-p) for p = exp(m), so
    log odds(y) = m - log(1 - exp(m)) and the log odds ratio is log odds(y_w) - log odds(y_l).
    NLL_w is `chosen_nll` when given, else -logπ(y_w)/len_w (each answer's mean per-token NLL). TRL averages
    the NLL over all chosen tokens of the batch, and so does training here: it passes
    chosen_nll = -logπ(y_w) · batch / (chosen tokens in the batch).
    """
    chosen, rejected = p.policy_chosen_mean, p.policy_rejected_mean
    log_odds = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    nll = p.chosen_nll if p.chosen_nll is not None else -chosen
    return nll - p.beta * F.logsigmoid(log_odds)


def _spec(fn: LossFn, paper: str, description: str, *, reference: bool = True, lengths: bool = False,
          reads: tuple[str, ...] = ()) -> LossSpec:
    return LossSpec(fn=fn, needs_reference=reference, needs_lengths=lengths, paper=paper, description=description,
                    reads=reads)


_SMOOTHED = ("label_smoothing",)


LOSSES: dict[str, LossSpec] = {
    "sigmoid": _spec(sigmoid_loss, "Rafailov et al. 2023; Mitchell 2023",
                     "DPO's logistic loss on the margin; label_smoothing gives conservative DPO", reads=_SMOOTHED),
    "robust": _spec(robust_loss, "Chowdhury et al. 2024",
                    "DPO corrected for labels flipped at rate label_smoothing", reads=_SMOOTHED),
    "ipo": _spec(ipo_loss, "Azar et al. 2023",
                 "squared distance of the per-token margin from 1/(2β)", lengths=True),
    "hinge": _spec(hinge_loss, "Zhao et al. 2023 (SLiC)", "hinge on β times the margin"),
    "bco_pair": _spec(bco_pair_loss, "Jung et al. 2024",
                      "each answer classified good/bad around the running mean reward bco_delta"),
    "sppo_hard": _spec(sppo_hard_loss, "Wu et al. 2024",
                       "log-ratios pushed to +1/(2β) (chosen) and -1/(2β) (rejected)"),
    "nca_pair": _spec(nca_pair_loss, "Chen et al. 2024", "noise-contrastive alignment: absolute rewards"),
    "apo_zero": _spec(apo_zero_loss, "D'Oosterlinck et al. 2024",
                      "raise chosen, lower rejected; chosen answers better than the model's"),
    "apo_down": _spec(apo_down_loss, "D'Oosterlinck et al. 2024",
                      "lower both, rejected more; chosen answers worse than the model's"),
    "exo_pair": _spec(exo_pair_loss, "Ji et al. 2024",
                      "reverse KL to the smoothed label instead of DPO's forward KL", reads=_SMOOTHED),
    "discopop": _spec(discopop_loss, "Chris Lu et al. 2024",
                      "logistic and exponential losses blended by the margin (tau 0.05)"),
    "sigmoid_norm": _spec(sigmoid_norm_loss, "TRL's length-normalised DPO",
                          "DPO's logistic loss on the margin of per-token mean log-ratios", lengths=True,
                          reads=_SMOOTHED),
    "aot": _spec(aot_loss, "Melnyk et al. 2024", "the batch's sorted policy margins against its sorted reference "
                 "margins (a loss of the batch, not of each pair)", reads=_SMOOTHED),
    "aot_unpaired": _spec(aot_unpaired_loss, "Melnyk et al. 2024",
                          "the batch's sorted chosen log-ratios against its sorted rejected ones", reads=_SMOOTHED),
    "simpo": _spec(simpo_loss, "Meng et al. 2024", "reference-free margin of mean log-probs minus simpo_gamma",
                   reference=False, lengths=True, reads=(*_SMOOTHED, "simpo_gamma")),
    "orpo": _spec(orpo_loss, "Hong et al. 2024", "chosen NLL plus a log odds-ratio penalty; reference-free",
                  reference=False, lengths=True),
}

# Other names users type for a loss: "dpo" is TRL's name for DPO's logistic loss.
LOSS_ALIASES: dict[str, str] = {"dpo": "sigmoid"}


# ---------------------------------------------------------------------------------------------------- names
def parse_loss_spec(text: str) -> list[tuple[str, float]]:
    """'sigmoid' -> [('sigmoid', 1.0)]; 'sigmoid:0.8,bco_pair:0.2' -> [('sigmoid', 0.8), ('bco_pair', 0.2)].

    An alias (LOSS_ALIASES: 'dpo') comes back under the loss's own name.

    Raises ConfigError (one line) on an unknown name, a repeated name, or a weight that is not a positive number.
    """
    known = ", ".join(sorted([*LOSSES, *LOSS_ALIASES]))
    parts: list[tuple[str, float]] = []
    for item in str(text).split(","):
        name, sep, weight_text = item.partition(":")
        name = name.strip()
        name = LOSS_ALIASES.get(name, name)
        if name not in LOSSES:
            hint = difflib.get_close_matches(name, [*LOSSES, *LOSS_ALIASES], n=1)
            tip = f" (did you mean {hint[0]!r}?)" if hint else ""
            if name == "sft":
                tip = " (TRL's 'sft' term is --sft-weight here: sft_weight=W for weight W)"
            raise ConfigError(f"loss: unknown loss {name!r} in {text!r}{tip}; known losses: {known}")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"loss: weight of {name!r} must be a positive number, got {weight_text.strip()!r} "
                              f"in {text!r}; write e.g. 'sigmoid:0.8,bco_pair:0.2' (known losses: {known})")
        if any(name == seen for seen, _ in parts):
            raise ConfigError(f"loss: {name!r} is listed twice in {text!r}; give each loss once with its weight")
        parts.append((name, weight))
    return parts


def needs_reference(text: str) -> bool:
    """Whether any loss in `text` compares against a reference model (False: no reference model is loaded)."""
    return any(LOSSES[name].needs_reference for name, _ in parse_loss_spec(text))


def needs_lengths(text: str) -> bool:
    """Whether any loss in `text` needs the answer lengths (ipo, simpo, orpo)."""
    return any(LOSSES[name].needs_lengths for name, _ in parse_loss_spec(text))


# ---------------------------------------------------------------------------------------------------- entry point
def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    simpo_gamma: float = 0.5,
    bco_delta: float | Tensor = 0.0,
    discopop_tau: float = 0.05,
    chosen_nll: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss and implicit rewards for one batch.

    Args:
        policy_chosen_logps, policy_rejected_logps: [batch] summed log-probs (nats) of the answer tokens
            under the policy.
        ref_chosen_logps, ref_rejected_logps: [batch] the same under the reference; None is allowed when
            every loss in `loss_type` is reference-free (simpo, orpo).
        loss_type: a name from LOSSES, or a weighted mix like "sigmoid:0.8,bco_pair:0.2".
        beta: inverse temperature β; label_smoothing: ε, the assumed rate of flipped labels (sigmoid, robust,
            exo_pair, simpo); simpo_gamma: SimPO's margin γ; bco_delta: BCO's running mean reward δ;
            discopop_tau: DiscoPOP's τ.
        chosen_lengths, rejected_lengths: [batch] answer tokens, used by ipo, simpo and orpo to turn summed
            log-probs into per-token means (clamped to at least 1). Left out, the log-probs passed are taken
            as already length-normalised (TRL's loss functions receive them that way).
        chosen_nll: [batch] optional mean per-token NLL of the chosen answer for orpo;
            default -policy_chosen_logps / chosen_lengths.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each [batch]. losses = Σ weight·loss over the mix; take
        the mean for the step. Rewards are detached: β·(logπ - logπ_ref) when any loss in the mix uses the
        reference, else β times the per-token mean policy log-prob (what SimPO and ORPO compare; TRL reports
        the same).
    """
    parts = parse_loss_spec(loss_type)
    specs = [LOSSES[name] for name, _ in parts]
    use_reference = any(spec.needs_reference for spec in specs)
    if use_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss {loss_type!r} needs reference log-probs; got None")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    shape = policy_chosen_logps.shape
    given = {"policy_rejected_logps": policy_rejected_logps, "ref_chosen_logps": ref_chosen_logps,
             "ref_rejected_logps": ref_rejected_logps, "chosen_lengths": chosen_lengths,
             "rejected_lengths": rejected_lengths, "chosen_nll": chosen_nll}
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"policy_chosen_logps must have shape [batch], got {tuple(shape)}")
    for name, tensor in given.items():
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(shape)}, "
                             "the shape of policy_chosen_logps")

    def as_lengths(lengths: Tensor | None) -> Tensor:
        if lengths is None:
            return torch.ones_like(policy_chosen_logps)
        return lengths.to(policy_chosen_logps.dtype).clamp(min=1)

    pairs = Pairs(
        policy_chosen=policy_chosen_logps, policy_rejected=policy_rejected_logps,
        ref_chosen=ref_chosen_logps, ref_rejected=ref_rejected_logps,
        chosen_lengths=as_lengths(chosen_lengths), rejected_lengths=as_lengths(rejected_lengths),
        chosen_nll=chosen_nll, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
        bco_delta=bco_delta, discopop_tau=discopop_tau,
    )
    losses = sum(weight * LOSSES[name].fn(pairs) for name, weight in parts)

    with torch.no_grad():
        if use_reference:
            chosen_rewards, rejected_rewards = beta * pairs.chosen_logratio, beta * pairs.rejected_logratio
        else:  # every reference-free loss here (simpo, orpo) compares per-token means
            chosen_rewards, rejected_rewards = beta * pairs.policy_chosen_mean, beta * pairs.policy_rejected_mean
    return losses, chosen_rewards, rejected_rewards
