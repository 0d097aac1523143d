"""Online training moves the policy the judge's way, shown with a control.

On a tiny random model DPO at a high learning rate drifts whatever the preferences say, so one judge alone proves
little. Here two runs start from the same model with opposite judges (a fixed preference over token ids, and its
negative), and both trained models are scored on the same fresh pairs: answers sampled from the starting model
with another seed, judged by the first judge. The first model must prefer those pairs' chosen answers (implicit
reward, log pi - log pi_ref, higher for chosen) far more often than the second.
"""

from __future__ import annotations

import torch

import preftune
from preftune.generate import sample_groups
from preftune.models.load import load_model, load_tokenizer
from preftune.online.pairs import best_vs_worst, training_record
from tinylm import WORDS

PROMPTS = [" ".join(WORDS[i:i + 3 + i % 4]) for i in range(0, 44, 4)]
FRESH = [" ".join(WORDS[i:i + 4]) for i in range(1, len(WORDS) - 4, 3)]


def test_opposite_judges_move_the_policy_opposite_ways_on_fresh_pairs(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))

    def odd_tokens(prompt, answers):  # +1 per odd token id, -1 per even one, averaged: length does not count
        ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
        return [sum(1 if i % 2 else -1 for i in x) / max(1, len(x)) for x in ids]

    def even_tokens(prompt, answers):
        return [-s for s in odd_tokens(prompt, answers)]

    settings = dict(samples=4, rounds=2, steps_per_round=4, max_new_tokens=8, batch_size=4, lr=1e-3, beta=0.1,
                    pair_cut_answers=True)  # the random model's answers rarely end within 8 tokens
    for name, judge in (("odd", odd_tokens), ("even", even_tokens)):
        run = preftune.train("online", model=tiny_model_dir, data=PROMPTS, output_dir=tmp_path / name, judge=judge,
                             **settings)
        assert run.history[-1]["train_reward_accuracy"] >= 0.75  # each fits its own pairs

    start = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    records = [{"prompt": p, "system": None} for p in FRESH]
    answers = sample_groups(start, tok, [tok(p)["input_ids"] for p in FRESH], samples=4, max_new_tokens=8,
                            temperature=1.0, top_p=1.0, seed=999, device="cpu")
    fresh = best_vs_worst(records, answers, [odd_tokens(p, a) for p, a in zip(FRESH, answers)])
    pairs = [training_record(p) for p in fresh.pairs]
    assert len(pairs) >= 15
    odd = preftune.evaluate(model=tmp_path / "odd", ref_model=tiny_model_dir, data=pairs).summary
    even = preftune.evaluate(model=tmp_path / "even", ref_model=tiny_model_dir, data=pairs).summary
    assert odd["reward_accuracy"] >= 0.7 and odd["reward_margin"] > 0
    assert even["reward_accuracy"] <= 0.3 and even["reward_margin"] < 0
