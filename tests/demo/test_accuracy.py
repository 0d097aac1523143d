"""The demo's held-out accuracy: sampled answers, judged, counted. A scripted model says exactly the answers the
test wrote, so the share of right ones is known by hand."""

from __future__ import annotations

import pytest
import torch

from preftune.demo.accuracy import sample_and_judge
from preftune.demo.base import train_tokenizer
from preftune.demo.corpus import load_facts, prompt_text, sft_texts
from preftune.demo.online import capital_judge


class ScriptedModel:
    """Stands in for a causal LM under `generate.sample_groups`: each prompt's rows are the answers in `script`
    (looked up by the prompt's text), each followed by EOS and then padding."""

    def __init__(self, tokenizer, script: dict[str, list[str]]):
        self.tokenizer, self.script = tokenizer, script
        self.training = False
        self.config = type("Config", (), {"use_cache": False})()
        self.calls: list[dict] = []

    def eval(self):
        return self

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def generate(self, input_ids, attention_mask, num_return_sequences, eos_token_id, pad_token_id, **kw):
        self.calls.append({"samples": num_return_sequences, **kw})
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
            answers = self.script[prompt]
            assert len(answers) == num_return_sequences
            for answer in answers:
                rows.append(ids + self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos_token_id])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


@pytest.fixture(scope="module")
def book():
    return load_facts()


@pytest.fixture(scope="module")
def tokenizer(book):
    return train_tokenizer(sft_texts(book)[:400], vocab_size=512)


def test_share_of_sampled_answers_the_judge_scores_right_is_counted_by_hand(book, tokenizer):
    australia, canada = book.facts[0], book.facts[1]
    assert (australia.capital, canada.capital) == ("Canberra", "Ottawa")
    template = book.held_out_templates[0]
    a, c = prompt_text(template, australia), prompt_text(template, canada)
    script = {a: [" Canberra", " Sydney", " Canberra Sydney", " Canberra"],  # 2 right: more after the city is wrong
              c: [" Toronto", "", " Ottawa", " Ottaw"]}                  # 1 right: empty and cut-off answers are wrong
    calls = []
    capitals = capital_judge(book)

    def judge(prompt, answers):
        calls.append((prompt, list(answers)))
        return capitals(prompt, answers)

    model = ScriptedModel(tokenizer, script)
    got = sample_and_judge(model, tokenizer, [a, c], judge, samples=4, temperature=1.0, max_new_tokens=4, seed=0,
                           device="cpu")
    assert calls == [(a, script[a]), (c, script[c])]          # every prompt judged once, with its own answers
    assert got.answers == [script[a], script[c]]
    assert got.scores == [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
    assert (got.right, got.total) == (3, 8)
    assert got.accuracy == 3 / 8
    assert [call["do_sample"] for call in model.calls] == [True]  # sampled, at the temperature asked for
    assert model.calls[0]["temperature"] == 1.0 and model.calls[0]["max_new_tokens"] == 4
    assert got.records("sft")[1] == {"stage": "sft", "prompt": c, "answers": script[c],
                                     "scores": [0.0, 0.0, 1.0, 0.0]}


def test_only_a_score_of_one_counts_as_right(tokenizer):
    prompts = ["Q1", "Q2"]
    script = {"Q1": [" x", " y", " z"], "Q2": [" x", " y", " z"]}
    graded = {"Q1": [1.0, 0.5, 0.0], "Q2": [1.0, 1.0, 0.0]}  # half right is not right
    got = sample_and_judge(ScriptedModel(tokenizer, script), tokenizer, prompts, lambda p, ans: graded[p],
                           samples=3, temperature=1.0, max_new_tokens=2, seed=0, device="cpu")
    assert (got.right, got.total) == (3, 6)
