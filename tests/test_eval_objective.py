"""The loss reported on held-out pairs is the loss the run trains on, and evaluation runs as the run is set up.

The expected numbers come from plain whole-model forwards (full logits, one sequence at a time) and the BCO /
RPO formulas written as softplus terms, not from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tinylm import fact_pairs, make_model_dir, make_tokenizer, write_jsonl
from transformers import AutoModelForCausalLM

from preftune.config import TrainConfig
from preftune.data.records import PreferencePair
from preftune.data.tokenize import tokenize_all
from preftune.metrics import evaluate_during
from preftune.training.objectives import PreferenceObjective
from preftune.training.loop import run

BETA = 1.0      # rewards of order one, so BCO's shift changes the loss well beyond the tolerance
RPO = 0.5       # weight of the NLL term on chosen answers
TOL = 1e-4


def summed_logp(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """log p(answer | prompt) from one forward of the whole sequence, in float64 from the logits."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt_ids) - 1 + t, a]) for t, a in enumerate(answer_ids))


def softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def bco_rpo(policy, ref, lengths, delta: float, rpo: float) -> float:
    """Mean over pairs of paired BCO, -log σ(r_w - δ) - log σ(δ - r_l) = softplus(δ - r_w) + softplus(r_l - δ),
    plus rpo times the NLL per chosen token of the batch (TRL 1.16's "sft" term: all pairs are one batch here)."""
    total = 0.0
    for (pc, pr), (rc, rr) in zip(policy, ref):
        r_w, r_l = BETA * (pc - rc), BETA * (pr - rr)
        total += softplus(delta - r_w) + softplus(r_l - delta)
    nll_per_token = -sum(pc for pc, _ in policy) / sum(lc for lc, _ in lengths)
    return total / len(policy) + rpo * nll_per_token


def test_bco_eval_loss_is_the_training_objective_with_the_running_shift(tmp_path, tiny_model_dir):
    """One step on 8 pairs, evaluated on the same 8 pairs: the shift after the step is the mean reward of the
    step's batch under the starting model, and the eval loss uses it (and the RPO term) with the final model."""
    ref_dir = make_model_dir(tmp_path / "ref", seed=1)  # a different reference, so rewards start away from 0
    data = write_jsonl(tmp_path / "pairs.jsonl", fact_pairs(8))
    cfg = TrainConfig(stage="dpo", model=str(tiny_model_dir), ref_model=str(ref_dir), data=str(data),
                      eval_data=str(data), output_dir=str(tmp_path / "run"), loss="bco_pair", beta=BETA,
                      sft_weight=RPO, max_steps=1, batch_size=8, lr=1e-2, max_length=64, device="cpu",
                      dtype="float32", quiet=True, seed=0)
    final = run(cfg, command="test")

    tok = make_tokenizer()
    items, _ = tokenize_all(tok, [PreferencePair(p["prompt"], p["chosen"], p["rejected"]) for p in fact_pairs(8)],
                            max_length=64)
    assert len(items) == 8

    def table(path):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        return [(summed_logp(model, it.prompt_ids, it.chosen_ids), summed_logp(model, it.prompt_ids, it.rejected_ids))
                for it in items]

    start, ref, end = table(tiny_model_dir), table(ref_dir), table(tmp_path / "run")
    lengths = [(len(it.chosen_ids), len(it.rejected_ids)) for it in items]
    delta = sum(BETA * (p - r) for ps, rs in zip(start, ref) for p, r in zip(ps, rs)) / 16

    # The training loss of step 1 (starting model, the shift of its own batch) and the eval loss after it.
    assert final["loss"] == pytest.approx(bco_rpo(start, ref, lengths, delta, RPO), abs=TOL)
    expected = bco_rpo(end, ref, lengths, delta, RPO)
    assert final["eval_loss"] == pytest.approx(expected, abs=TOL)
    # The check tells the parts apart: without the shift, or without the RPO term, the number is far off.
    assert abs(delta) > 0.1
    assert abs(bco_rpo(end, ref, lengths, 0.0, RPO) - expected) > 10 * TOL
    assert abs(bco_rpo(end, ref, lengths, delta, 0.0) - expected) > 10 * TOL


def test_evaluation_honours_trim_padding(tiny_model_dir):
    """Pairs of very different lengths: trimmed, the eval batch runs as several length groups (several forwards
    of the decoder); untrimmed, as one. Both give the same numbers."""
    tok = make_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    long = " the sky is blue and grass is green ." * 6
    raw = [PreferencePair("cats", " chase mice .", " rome ."), PreferencePair("the capital of france is", long, "!"),
           PreferencePair("water", " boils .", long), PreferencePair("the sky is", " blue .", " green .")]
    items, _ = tokenize_all(tok, raw, max_length=256)
    calls = []
    model.model.layers[0].register_forward_hook(lambda *_: calls.append(1))

    def evaluate(trim: bool) -> tuple[dict, int]:
        cfg = TrainConfig(stage="dpo", model="m", data="d", output_dir="o", loss="simpo", batch_size=4,
                          prefix_sharing=False, trim_padding=trim)
        calls.clear()
        out = evaluate_during(model, None, items, cfg, tok.pad_token_id, torch.device("cpu"),
                              PreferenceObjective(cfg))
        return out, len(calls)

    trimmed, trimmed_calls = evaluate(True)
    whole, whole_calls = evaluate(False)
    assert whole_calls == 1 and trimmed_calls > 1
    assert trimmed.keys() == whole.keys()
    for k in whole:
        assert trimmed[k] == pytest.approx(whole[k], abs=1e-4), k
