"""Preference losses against values worked out by hand with `math` on small literal numbers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.errors import ConfigError
from preftune.losses import LOSSES, log1mexp, needs_reference, parse_loss_spec, preference_loss

# Two pairs. Pair 0: chosen log-ratio a = +0.5, rejected b = -0.5, margin h = 1.0.
#            Pair 1: a = -0.5, b = +0.2, h = -0.7.
PC, PR = [-4.0, -7.5], [-6.0, -7.0]  # policy log-probs, summed over answer tokens
RC, RR = [-4.5, -7.0], [-5.5, -7.2]  # reference log-probs
LC, LR = [4, 5], [3, 6]  # answer tokens
BETA = 0.5


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def run(loss_type: str, *, beta: float = BETA, **kw):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return preference_loss(t(PC), t(PR), t(RC), t(RR), loss_type=loss_type, beta=beta,
                           chosen_lengths=torch.tensor(LC), rejected_lengths=torch.tensor(LR), **kw)


# Per pair i, from the literals: pc, pr, rc, rr, lc, lr -> expected loss. Written out, not calling the module.
def _margin(i):
    return (PC[i] - RC[i]) - (PR[i] - RR[i])


def _a(i):
    return PC[i] - RC[i]


def _b(i):
    return PR[i] - RR[i]


def _log_odds(m):
    return m - math.log(1 - math.exp(m))


HAND = {
    "sigmoid": lambda i: -logsig(BETA * _margin(i)),
    "robust": lambda i: -logsig(BETA * _margin(i)),  # ε = 0: plain DPO
    "ipo": lambda i: (_a(i) / LC[i] - _b(i) / LR[i] - 1 / (2 * BETA)) ** 2,
    "hinge": lambda i: max(0.0, 1 - BETA * _margin(i)),
    "bco_pair": lambda i: -logsig(BETA * _a(i)) - logsig(-BETA * _b(i)),
    "sppo_hard": lambda i: (_a(i) - 1 / (2 * BETA)) ** 2 + (_b(i) + 1 / (2 * BETA)) ** 2,
    "nca_pair": lambda i: -logsig(BETA * _a(i)) - 0.5 * logsig(-BETA * _a(i)) - 0.5 * logsig(-BETA * _b(i)),
    "apo_zero": lambda i: (1 - sig(BETA * _a(i))) + sig(BETA * _b(i)),
    "apo_down": lambda i: sig(BETA * _a(i)) + (1 - sig(BETA * _margin(i))),
    "exo_pair": lambda i: (sig(BETA * _margin(i)) * (logsig(BETA * _margin(i)) - math.log(1 - 1e-3))
                           + sig(-BETA * _margin(i)) * (logsig(-BETA * _margin(i)) - math.log(1e-3))),
    "discopop": lambda i: ((1 - sig(BETA * _margin(i) / 0.05)) * -logsig(BETA * _margin(i))
                           + sig(BETA * _margin(i) / 0.05) * math.exp(-BETA * _margin(i))),
    "simpo": lambda i: -logsig(BETA * (PC[i] / LC[i] - PR[i] / LR[i]) - 0.5),
    "orpo": lambda i: -PC[i] / LC[i] - BETA * logsig(_log_odds(PC[i] / LC[i]) - _log_odds(PR[i] / LR[i])),
}


def test_every_registered_loss_has_a_hand_computed_check():
    assert set(HAND) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(HAND))
def test_loss_matches_hand_computation(name):
    losses, _, _ = run(name)
    assert losses.tolist() == pytest.approx([HAND[name](0), HAND[name](1)], abs=1e-6)


def test_hand_numbers_are_what_the_formulas_say():
    # One spot check of the literals themselves, so a typo in PC..RR cannot make every test vacuous.
    assert (_margin(0), _margin(1)) == pytest.approx((1.0, -0.7))
    assert HAND["sigmoid"](0) == pytest.approx(math.log(1 + math.exp(-0.5)))
    assert HAND["hinge"](1) == pytest.approx(1.35)


def test_label_smoothing_on_sigmoid_is_conservative_dpo():
    eps = 0.1
    losses, _, _ = run("sigmoid", label_smoothing=eps)
    expected = [-(1 - eps) * logsig(BETA * _margin(i)) - eps * logsig(-BETA * _margin(i)) for i in (0, 1)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_robust_divides_out_the_flip_rate():
    eps = 0.2
    losses, _, _ = run("robust", label_smoothing=eps)
    expected = [((1 - eps) * -logsig(BETA * _margin(i)) - eps * -logsig(-BETA * _margin(i))) / (1 - 2 * eps)
                for i in (0, 1)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_exo_pair_uses_the_given_label_smoothing():
    eps = 0.05
    losses, _, _ = run("exo_pair", label_smoothing=eps)
    z = [BETA * _margin(i) for i in (0, 1)]
    expected = [sig(x) * (logsig(x) - math.log(1 - eps)) + sig(-x) * (logsig(-x) - math.log(eps)) for x in z]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_simpo_gamma_and_smoothing():
    losses, _, _ = run("simpo", simpo_gamma=1.5, label_smoothing=0.1)
    z = [BETA * (PC[i] / LC[i] - PR[i] / LR[i]) - 1.5 for i in (0, 1)]
    assert losses.tolist() == pytest.approx([-0.9 * logsig(x) - 0.1 * logsig(-x) for x in z], abs=1e-6)


def test_bco_delta_shifts_rewards_and_gets_no_gradient():
    delta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    losses, _, _ = run("bco_pair", bco_delta=delta)
    expected = [-logsig(BETA * _a(i) - 0.3) - logsig(-(BETA * _b(i) - 0.3)) for i in (0, 1)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert not losses.requires_grad


def test_discopop_tau():
    losses, _, _ = run("discopop", discopop_tau=0.5)
    z = [BETA * _margin(i) for i in (0, 1)]
    expected = [(1 - sig(x / 0.5)) * -logsig(x) + sig(x / 0.5) * math.exp(-x) for x in z]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_orpo_takes_a_given_chosen_nll():
    nll = torch.tensor([2.0, 3.0], dtype=torch.float64)
    losses, _, _ = run("orpo", chosen_nll=nll)
    expected = [n - BETA * logsig(_log_odds(PC[i] / LC[i]) - _log_odds(PR[i] / LR[i])) for i, n in enumerate((2, 3))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_mix_is_the_weighted_sum_of_parts():
    losses, _, _ = run("sigmoid:0.8, bco_pair:0.2")
    expected = [0.8 * HAND["sigmoid"](i) + 0.2 * HAND["bco_pair"](i) for i in (0, 1)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_shapes_and_detached_rewards(name):
    pc = torch.tensor(PC, requires_grad=True)
    pr = torch.tensor(PR, requires_grad=True)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        pc, pr, torch.tensor(RC), torch.tensor(RR), loss_type=name, beta=BETA,
        chosen_lengths=torch.tensor(LC), rejected_lengths=torch.tensor(LR))
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (2,)
    assert losses.dtype == torch.float32
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_rewards_against_reference():
    _, chosen, rejected = run("sigmoid")
    assert chosen.tolist() == pytest.approx([BETA * 0.5, BETA * -0.5])
    assert rejected.tolist() == pytest.approx([BETA * -0.5, BETA * 0.2])


@pytest.mark.parametrize("name", ["simpo", "orpo", "simpo:1,orpo:0.5"])
def test_reference_free_rewards_are_beta_times_mean_logp_and_need_no_reference(name):
    _, chosen, rejected = preference_loss(
        torch.tensor(PC), torch.tensor(PR), None, None, loss_type=name, beta=BETA,
        chosen_lengths=torch.tensor(LC), rejected_lengths=torch.tensor(LR))
    assert chosen.tolist() == pytest.approx([BETA * -1.0, BETA * -1.5])
    assert rejected.tolist() == pytest.approx([BETA * -2.0, BETA * -7.0 / 6])


# Losses whose gradient always pushes the chosen log-prob up (apo_down lowers it by design).
RAISES_CHOSEN = ["sigmoid", "robust", "ipo", "hinge", "bco_pair", "sppo_hard", "nca_pair", "apo_zero",
                 "exo_pair", "discopop", "simpo", "orpo"]


@pytest.mark.parametrize("name", RAISES_CHOSEN)
def test_loss_falls_when_chosen_logp_rises(name):
    pc = torch.tensor(PC, requires_grad=True)
    pr = torch.tensor(PR, requires_grad=True)
    kw = dict(loss_type=name, beta=BETA, chosen_lengths=torch.tensor(LC), rejected_lengths=torch.tensor(LR))
    losses, _, _ = preference_loss(pc, pr, torch.tensor(RC), torch.tensor(RR), **kw)
    losses.sum().backward()
    assert (pc.grad < 0).all(), pc.grad
    if name in ("sigmoid", "robust", "ipo", "hinge", "simpo", "orpo", "exo_pair", "discopop"):
        assert (pr.grad > 0).all(), pr.grad
    with torch.no_grad():
        later, _, _ = preference_loss(pc + 0.01, pr, torch.tensor(RC), torch.tensor(RR), **kw)
    assert (later < losses.detach()).all()


def test_label_smoothing_one_half_is_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        run("robust", label_smoothing=0.5)


# ------------------------------------------------------------------------------------------------ the mix string
def test_parse_single_name_and_weights():
    assert parse_loss_spec("sigmoid") == [("sigmoid", 1.0)]
    assert parse_loss_spec(" sigmoid:0.8 , bco_pair:0.2 ") == [("sigmoid", 0.8), ("bco_pair", 0.2)]
    assert parse_loss_spec("ipo:2") == [("ipo", 2.0)]


@pytest.mark.parametrize("text", ["sigmod", "dpoo", "", "sigmoid:0.5,kto:0.5"])
def test_unknown_loss_names_every_known_one(text):
    with pytest.raises(ConfigError) as info:
        parse_loss_spec(text)
    message = str(info.value)
    assert "\n" not in message and "unknown loss" in message
    for name in LOSSES:
        assert name in message


def test_dpo_is_the_name_trl_users_type_for_sigmoid():
    assert parse_loss_spec("dpo") == [("sigmoid", 1.0)]
    assert parse_loss_spec("dpo:0.8,bco_pair:0.2") == [("sigmoid", 0.8), ("bco_pair", 0.2)]
    with pytest.raises(ConfigError, match="listed twice"):
        parse_loss_spec("dpo,sigmoid")


def test_unknown_loss_suggests_the_near_name():
    with pytest.raises(ConfigError, match="did you mean 'sigmoid'"):
        parse_loss_spec("sigmod")


@pytest.mark.parametrize("text", ["sigmoid:abc", "sigmoid:-1", "sigmoid:0", "sigmoid:nan", "sigmoid:inf",
                                  "sigmoid:", "sigmoid:0.8,ipo:x"])
def test_bad_weight_is_a_config_error(text):
    with pytest.raises(ConfigError, match="weight of .* must be a positive number") as info:
        parse_loss_spec(text)
    assert "known losses" in str(info.value)


def test_repeated_name_is_a_config_error():
    with pytest.raises(ConfigError, match="listed twice"):
        parse_loss_spec("sigmoid:0.5,sigmoid:0.5")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_needs_reference(name):
    reference_free = name in ("simpo", "orpo")
    assert needs_reference(name) is not reference_free
    partner = "simpo" if name == "orpo" else "orpo"  # mixed with a reference-free loss: the other one decides
    assert needs_reference(f"{partner}:0.5,{name}:0.5") is not reference_free


# ------------------------------------------------------------------------------------------------ misuse
def test_missing_reference_says_what_is_missing():
    t = torch.tensor
    with pytest.raises(ValueError, match="reference"):
        preference_loss(t(PC), t(PR), None, None, loss_type="sigmoid")


def test_without_lengths_log_probs_are_taken_as_already_normalised():
    # IPO on the given numbers: ((pc - rc) - (pr - rr) - 1/(2 beta))^2, pair by pair
    t = torch.tensor
    losses, _, _ = preference_loss(t(PC), t(PR), t(RC), t(RR), loss_type="ipo", beta=BETA)
    for i in range(len(PC)):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        assert math.isclose(float(losses[i]), (h - 1 / (2 * BETA)) ** 2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        preference_loss(t(PC), t(PR[:1]), t(RC), t(RR))


# ------------------------------------------------------------------------------------------------ numerics
def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-6, -0.3, -0.7, -5.0, -40.0], dtype=torch.float64)
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert log1mexp(x).tolist() == pytest.approx(expected, rel=1e-12)
    assert torch.isfinite(log1mexp(torch.tensor([0.0]))).all()


def test_extreme_inputs_stay_finite():
    big = torch.tensor([0.0, -3000.0])  # a certain answer, and a hopeless one
    for name in LOSSES:
        losses, _, _ = preference_loss(big, big.flip(0), torch.zeros(2), torch.zeros(2), loss_type=name, beta=1.0,
                                       chosen_lengths=torch.tensor([1, 1]), rejected_lengths=torch.tensor([1, 1]))
        assert torch.isfinite(losses).all(), name


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-50, 0), min_size=4, max_size=4), st.floats(-20, 20))
def test_reference_losses_depend_only_on_log_ratios(values, shift):
    # Moving policy and reference together by the same amount leaves every log-ratio, and so the loss, unchanged.
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in values)
    for name, spec in LOSSES.items():
        if spec.needs_reference and not spec.needs_lengths:
            base, _, _ = preference_loss(pc, pr, rc, rr, loss_type=name)
            moved, _, _ = preference_loss(pc + shift, pr + shift, rc + shift, rr + shift, loss_type=name)
            assert moved.item() == pytest.approx(base.item(), rel=1e-9, abs=1e-9), name
