"""Preference losses against independent sources, pair by pair.

- TRL 1.16's own code, called on the same log-prob tensors: `DPOTrainer._compute_loss` (sigmoid, robust, ipo,
  hinge, bco_pair, sppo_hard, nca_pair, apo_zero, apo_down, exo_pair, discopop), `CPOTrainer.cpo_loss` (simpo,
  and conservative DPO's smoothing) and `ORPOTrainer.odds_ratio_loss` (orpo). Skipped when trl is not installed.
- Where TRL 1.16 has no counterpart (BCO's shift δ, the smoothing of sigmoid in DPO, exo_pair's default ε, ORPO's
  per-answer NLL), the paper's formula computed another way: cross-entropies with torch's own functions, the
  Bradley-Terry probability, the KL divergence summed over the two answers, odds from probabilities.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
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


def _wide() -> dict[str, list]:
    """Eight pairs with log-ratios up to ±8 nats and 1 to 20 answer tokens (rewards far from 0 on both sides)."""
    g = torch.Generator().manual_seed(0)
    ref = -torch.rand(2, 8, generator=g, dtype=torch.float64) * 40 - 1
    policy = ref + (torch.rand(2, 8, generator=g, dtype=torch.float64) - 0.5) * 16
    lengths = torch.randint(1, 21, (2, 8), generator=g)
    return {"pc": policy[0].tolist(), "pr": policy[1].tolist(), "rc": ref[0].tolist(), "rr": ref[1].tolist(),
            "lc": lengths[0].tolist(), "lr": lengths[1].tolist()}


DATA = {"literals": {"pc": PC, "pr": PR, "rc": RC, "rr": RR, "lc": LC, "lr": LR}, "wide": _wide()}


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def run(loss_type: str, *, beta: float = BETA, **kw):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return preference_loss(t(PC), t(PR), t(RC), t(RR), loss_type=loss_type, beta=beta,
                           chosen_lengths=torch.tensor(LC), rejected_lengths=torch.tensor(LR), **kw)


def ours(loss_type: str, d: dict, *, beta: float = BETA, **kw) -> list[float]:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    losses, _, _ = preference_loss(t(d["pc"]), t(d["pr"]), t(d["rc"]), t(d["rr"]), loss_type=loss_type, beta=beta,
                                   chosen_lengths=torch.tensor(d["lc"]), rejected_lengths=torch.tensor(d["lr"]), **kw)
    return losses.tolist()


# ------------------------------------------------------------------------------------------------ TRL 1.16
@pytest.fixture(scope="module")
def trl():
    try:
        from trl import DPOTrainer
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
    except ImportError as exc:  # not installed, or a version without these trainers
        pytest.skip(f"TRL's trainers are not importable: {exc}")

    return SimpleNamespace(dpo=DPOTrainer, cpo=CPOTrainer, orpo=ORPOTrainer)


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def trl_dpo(trl, loss_type: str, d: dict, *, beta: float = BETA, label_smoothing: float = 0.0,
            discopop_tau: float = 0.05) -> list[float]:
    """Per-pair loss from TRL's `DPOTrainer._compute_loss`, one pair per call (it returns the batch mean)."""
    keys = ("pc", "pr", "rc", "rr", "lc", "lr")
    return [trl_dpo_mean(trl, loss_type, dict(zip(keys, ([v] for v in row))), beta=beta,
                         label_smoothing=label_smoothing, discopop_tau=discopop_tau)
            for row in zip(*(d[k] for k in keys))]


def trl_dpo_mean(trl, loss_type: str, d: dict, *, beta: float = BETA, label_smoothing: float = 0.0,
                 discopop_tau: float = 0.05) -> float:
    """The mean loss of the pairs of `d` as one batch, from TRL's `DPOTrainer._compute_loss`.

    TRL gets the policy's per-token log-probs from a model forward and sums them over the completion mask; here a
    stand-in model returns log-probs that sum to the pairs' numbers, over masks as long as the answers (IPO
    normalises by them). The reference log-probs go in precomputed, as with TRL's precompute_ref_log_probs. TRL's
    rows are the batch's chosen answers, then its rejected ones.
    """
    n, width = len(d["pc"]), max(d["lc"] + d["lr"])
    per_token = torch.zeros(2 * n, width, dtype=torch.float64)
    mask = torch.zeros(2 * n, width + 1, dtype=torch.long)  # position 0 is the prompt; the answer follows
    for row, (logp, length) in enumerate(zip(d["pc"] + d["pr"], d["lc"] + d["lr"])):
        per_token[row, :length] = logp / length
        mask[row, 1:length + 1] = 1
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * n, width),
                              mean_logits=torch.zeros(2 * n, width),
                              is_top1=torch.zeros(2 * n, width, dtype=torch.bool))
    inputs = {"input_ids": torch.ones(2 * n, width + 1, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, width + 1), "completion_mask": mask,
              "ref_chosen_logps": torch.tensor(d["rc"], dtype=torch.float64),
              "ref_rejected_logps": torch.tensor(d["rr"], dtype=torch.float64)}
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, args=SimpleNamespace(discopop_tau=discopop_tau),
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    return float(trl.dpo._compute_loss(trainer, lambda **_: outputs, inputs, False))


def _means(d: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean policy log-probs, what TRL's CPO (SimPO) and ORPO trainers pass to their losses."""
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return t(d["pc"]) / t(d["lc"]), t(d["pr"]) / t(d["lr"])


def trl_cpo(trl, loss_type: str, chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float = BETA,
            label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> list[float]:
    trainer = SimpleNamespace(alpha=0.0, accelerator=_accelerator(), loss_type=loss_type, beta=beta,
                              label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
    return trl.cpo.cpo_loss(trainer, chosen, rejected)[0].tolist()


# TRL 1.16's DPO loss names, each with the settings compared: ours and TRL's.
TRL_DPO_CASES = {
    "sigmoid": ({}, {}),
    "robust": ({}, {}),
    "robust eps 0.2": ({"label_smoothing": 0.2}, {"label_smoothing": 0.2}),
    "ipo": ({}, {}),
    "hinge": ({}, {}),
    "bco_pair": ({}, {}),                     # TRL 1.16 keeps no shift: it is our bco_delta = 0
    "sppo_hard": ({}, {}),
    "nca_pair": ({}, {}),
    "apo_zero": ({}, {}),
    "apo_down": ({}, {}),
    "exo_pair": ({}, {"label_smoothing": 1e-3}),  # our ε = 0 stands for the paper's 1e-3; TRL 1.16 refuses 0
    "exo_pair eps 0.05": ({"label_smoothing": 0.05}, {"label_smoothing": 0.05}),
    "discopop": ({}, {}),
    "discopop tau 0.5": ({"discopop_tau": 0.5}, {"discopop_tau": 0.5}),
    "sigmoid_norm": ({}, {}),
}
BATCH_LOSSES = ("aot", "aot_unpaired")  # losses of a whole batch (its ranks), compared on whole batches


def test_every_registered_loss_is_compared_with_trl():
    assert {case.split()[0] for case in TRL_DPO_CASES} | {"simpo", "orpo", *BATCH_LOSSES} == set(LOSSES)


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("case", sorted(TRL_DPO_CASES))
def test_loss_equals_trl_dpo_trainer(trl, case, data):
    name, (our_kw, trl_kw) = case.split()[0], TRL_DPO_CASES[case]
    tol = 1e-6 if name == "exo_pair" else 1e-9  # TRL takes log ε of a float32 tensor
    for beta in (BETA, 0.1):
        assert ours(name, DATA[data], beta=beta, **our_kw) == pytest.approx(
            trl_dpo(trl, name, DATA[data], beta=beta, **trl_kw), rel=tol, abs=tol)


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("name, eps", [("aot", 0.0), ("aot", 0.1), ("aot_unpaired", 0.0), ("sigmoid", 0.0)])
def test_batch_losses_equal_trl_on_whole_batches(trl, data, name, eps):
    """AOT matches the batch's sorted margins by rank: the batch mean is TRL's, and on the wide data (whose
    ranks mix pairs) differs from the mean of each pair's loss alone."""
    d = DATA[data]
    expected = trl_dpo_mean(trl, name, d, label_smoothing=eps)
    assert sum(ours(name, d, label_smoothing=eps)) / len(d["pc"]) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    if name != "sigmoid" and data == "wide":
        alone = sum(trl_dpo(trl, name, d, label_smoothing=eps)) / len(d["pc"])
        assert abs(alone - expected) > 1e-3


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_equals_trl_cpo_trainer(trl, data, eps):
    chosen, rejected = _means(DATA[data])
    for beta, gamma in ((BETA, 0.5), (2.0, 1.5)):
        expected = trl_cpo(trl, "simpo", chosen, rejected, beta=beta, label_smoothing=eps, simpo_gamma=gamma)
        got = ours("simpo", DATA[data], beta=beta, label_smoothing=eps, simpo_gamma=gamma)
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("data", sorted(DATA))
def test_sigmoid_label_smoothing_equals_trl_conservative_loss(trl, data):
    """TRL 1.16's DPO ignores label_smoothing for sigmoid; its CPO trainer's sigmoid loss is the conservative
    (smoothed) logistic loss of a margin, so it gets the DPO margin's log-ratios as its inputs."""
    d = DATA[data]
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    chosen, rejected = t(d["pc"]) - t(d["rc"]), t(d["pr"]) - t(d["rr"])
    expected = trl_cpo(trl, "sigmoid", chosen, rejected, label_smoothing=0.1)
    assert ours("sigmoid", d, label_smoothing=0.1) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("data", sorted(DATA))
def test_orpo_equals_trl_orpo_trainer(trl, data):
    """TRL returns β·log σ(log odds ratio) per pair and adds the NLL of all chosen tokens of the batch; ours
    with chosen_nll given is that NLL minus the same term."""
    d = DATA[data]
    chosen, rejected = _means(d)
    for beta in (BETA, 0.1):
        trainer = SimpleNamespace(beta=beta, accelerator=_accelerator())
        ratio_term = trl.orpo.odds_ratio_loss(trainer, chosen, rejected)[0].double()
        batch_nll = -sum(d["pc"]) / sum(d["lc"])  # TRL's NLL: mean over every chosen token of the batch
        expected = (batch_nll - ratio_term).tolist()
        nll = torch.full((len(d["pc"]),), batch_nll, dtype=torch.float64)
        assert ours("orpo", d, beta=beta, chosen_nll=nll) == pytest.approx(expected, rel=1e-6, abs=1e-6)  # TRL: fp32


# ------------------------------------------------------------------------------------------------ the papers
@pytest.mark.parametrize("data", sorted(DATA))
def test_sigmoid_is_minus_log_bradley_terry_probability(data):
    """DPO (Rafailov et al. 2023, eq. 7): -log of the Bradley-Terry probability that the chosen answer wins,
    p = exp(β·a) / (exp(β·a) + exp(β·b)) with implicit rewards β·a, β·b."""
    d = DATA[data]
    for i, got in enumerate(ours("sigmoid", d)):
        ra, rb = BETA * (d["pc"][i] - d["rc"][i]), BETA * (d["pr"][i] - d["rr"][i])
        top = max(ra, rb)  # scaled so that neither exponential overflows
        p = math.exp(ra - top) / (math.exp(ra - top) + math.exp(rb - top))
        assert got == pytest.approx(-math.log(p), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("data", sorted(DATA))
def test_conservative_dpo_is_cross_entropy_with_a_soft_label(data):
    """cDPO (Mitchell 2023): the binary cross-entropy of σ(β·h) against the label 1 - ε."""
    d, eps = DATA[data], 0.1
    h = torch.tensor([(d["pc"][i] - d["rc"][i]) - (d["pr"][i] - d["rr"][i]) for i in range(len(d["pc"]))],
                     dtype=torch.float64)
    expected = F.binary_cross_entropy_with_logits(BETA * h, torch.full_like(h, 1 - eps), reduction="none")
    assert ours("sigmoid", d, label_smoothing=eps) == pytest.approx(expected.tolist(), rel=1e-9, abs=1e-12)


def test_robust_dpo_is_unbiased_under_label_flips():
    """Chowdhury et al. 2024: with labels flipped at rate ε, the expected robust loss is the clean DPO loss,
    (1-ε)·L(y_w, y_l) + ε·L(y_l, y_w) = -log σ(β·h). L(y_l, y_w) is the loss of the pair given the other way."""
    d, eps = DATA["wide"], 0.2
    swapped = {"pc": d["pr"], "pr": d["pc"], "rc": d["rr"], "rr": d["rc"], "lc": d["lr"], "lr": d["lc"]}
    given_way, flipped = ours("robust", d, label_smoothing=eps), ours("robust", swapped, label_smoothing=eps)
    clean = ours("sigmoid", d)
    for g, f, c in zip(given_way, flipped, clean):
        assert (1 - eps) * g + eps * f == pytest.approx(c, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("delta", [0.3, -1.2])
def test_bco_pair_with_a_shift_is_two_binary_cross_entropies(delta):
    """BCO (Jung et al. 2024, eq. 7 on pairs): the chosen answer classified as good and the rejected as bad, by
    the logistic of the reward minus the shift δ: BCE(r_w - δ, 1) + BCE(r_l - δ, 0), with r = β·log-ratio."""
    d = DATA["wide"]
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    r_w, r_l = BETA * (t(d["pc"]) - t(d["rc"])), BETA * (t(d["pr"]) - t(d["rr"]))
    bce = lambda z, y: F.binary_cross_entropy_with_logits(z, torch.full_like(z, y), reduction="none")  # noqa: E731
    expected = bce(r_w - delta, 1.0) + bce(r_l - delta, 0.0)
    assert ours("bco_pair", d, bco_delta=delta) == pytest.approx(expected.tolist(), rel=1e-9, abs=1e-12)
    # The shift is a constant of the trainer's: no gradient flows into it.
    shift = torch.tensor(delta, dtype=torch.float64, requires_grad=True)
    losses, _, _ = run("bco_pair", bco_delta=shift)
    assert not losses.requires_grad


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_exo_pair_is_the_kl_divergence_over_the_two_answers(eps):
    """EXO (Ji et al. 2024, eq. 16, K = 2): KL(q ‖ p) with q = softmax(β·a, β·b) the model's preference between
    the two answers and p = (1-ε, ε) the label; ε = 0 means the paper's 1e-3."""
    d = DATA["wide"]
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    q = torch.softmax(BETA * torch.stack([t(d["pc"]) - t(d["rc"]), t(d["pr"]) - t(d["rr"])], dim=1), dim=1)
    label = eps or 1e-3
    p = torch.tensor([1 - label, label], dtype=torch.float64)
    expected = (q * (q.log() - p.log())).sum(dim=1)
    assert ours("exo_pair", d, label_smoothing=eps) == pytest.approx(expected.tolist(), rel=1e-9, abs=1e-12)


def test_orpo_is_nll_plus_the_odds_ratio_term():
    """ORPO (Hong et al. 2024, eqs. 4-7) per pair: the chosen answer's mean per-token NLL (or the one given),
    plus -β·log σ(log OR), computed from the odds p/(1-p) of each answer's per-token mean probability p."""
    d = DATA["literals"]
    expected = {}
    for i in range(2):
        p_w, p_l = math.exp(d["pc"][i] / d["lc"][i]), math.exp(d["pr"][i] / d["lr"][i])
        odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
        expected[i] = math.log1p(1 / odds_ratio)  # -log σ(log OR) = log(1 + 1/OR)
    default = ours("orpo", d)
    assert default == pytest.approx([-d["pc"][i] / d["lc"][i] + BETA * expected[i] for i in range(2)], rel=1e-9)
    nll = torch.tensor([2.0, 3.0], dtype=torch.float64)
    given_nll = ours("orpo", d, chosen_nll=nll)
    assert given_nll == pytest.approx([2.0 + BETA * expected[0], 3.0 + BETA * expected[1]], rel=1e-9)


def test_literals_are_what_the_comments_say():
    # One spot check of the literals themselves, so a typo in PC..RR cannot make the comparisons vacuous.
    margins = [(PC[i] - RC[i]) - (PR[i] - RR[i]) for i in range(2)]
    assert margins == pytest.approx([1.0, -0.7])
    assert run("sigmoid")[0][0].item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    assert run("hinge")[0][1].item() == pytest.approx(1.35)


def test_mix_is_the_weighted_sum_of_parts():
    losses, _, _ = run("sigmoid:0.8, bco_pair:0.2")
    sigmoid, bco = run("sigmoid")[0], run("bco_pair")[0]
    assert losses.tolist() == pytest.approx((0.8 * sigmoid + 0.2 * bco).tolist(), abs=1e-12)
    assert not torch.allclose(sigmoid, bco)  # the two parts differ, so the weights are visible


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
