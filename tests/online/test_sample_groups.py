"""Batched sampling with the KV cache: greedy rows equal one-prompt-at-a-time decoding; seeded sampling repeats."""

from __future__ import annotations

import torch

from preftune.generate import generate_answers, sample_groups
from preftune.models.load import load_model, load_tokenizer

PROMPTS = ["the capital of france is", "cats", "Human: what is the capital of spain ? Assistant:", "water boils at"]


def _setup(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    return model, tok, [tok(p)["input_ids"] for p in PROMPTS]


def test_left_padded_greedy_batch_equals_one_prompt_at_a_time(tiny_model_dir):
    model, tok, ids = _setup(tiny_model_dir)
    alone = generate_answers(model, tok, ids, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0, device="cpu")
    batched = sample_groups(model, tok, ids, samples=1, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0,
                            device="cpu", batch_size=3)  # prompts of different lengths share a batch
    assert [g[0] for g in batched] == alone
    assert any(a for a in alone)  # the model says something, so equality is not of empty strings


def test_seeded_sampling_repeats_and_differs_by_seed(tiny_model_dir):
    model, tok, ids = _setup(tiny_model_dir)
    kw = dict(samples=3, max_new_tokens=8, temperature=1.0, top_p=1.0, device="cpu", batch_size=2)
    first = sample_groups(model, tok, ids, seed=5, **kw)
    torch.manual_seed(123)  # the global generator's state before the call does not matter
    assert sample_groups(model, tok, ids, seed=5, **kw) == first
    assert sample_groups(model, tok, ids, seed=6, **kw) != first
    assert [len(g) for g in first] == [3, 3, 3, 3]
    assert len({a for g in first for a in g}) > 4  # samples of one prompt differ from each other



def test_each_sample_says_whether_it_ended_or_was_cut_off(tiny_model_dir):
    """Checked against each prompt decoded alone: an answer ended when EOS came within the token budget."""
    from preftune.generate import sample_ended_groups

    model, tok, ids = _setup(tiny_model_dir)
    seen = set()
    for budget in (1, 8, 40):
        kw = dict(samples=1, max_new_tokens=budget, temperature=0.0, top_p=1.0, seed=0, device="cpu", batch_size=3)
        texts, ended = sample_ended_groups(model, tok, ids, **kw)
        assert texts == sample_groups(model, tok, ids, **kw)
        for prompt, group in zip(ids, ended):
            alone = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=budget, do_sample=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            assert group == [tok.eos_token_id in alone[0, len(prompt):].tolist()]
            seen.add(group[0])
    assert seen == {True, False}
