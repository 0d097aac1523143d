"""The demo's corpus and pairs: the mixture rate, the held-out split, determinism, and the output-folder rules."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from preftune.demo.base import train_tokenizer
from preftune.demo.corpus import load_facts, pairs, sft_texts, write_demo_data
from preftune.demo.run import PLAN, SUMMARY, check_out
from preftune.errors import PreftuneError


@pytest.fixture(scope="module")
def book():
    return load_facts()


def test_every_fact_is_stated_in_every_template_with_the_set_share_of_wrong_answers(book):
    counts = Counter(sft_texts(book))
    assert sum(counts.values()) == len(book.facts) * len(book.templates) * book.mentions
    for fact in book.facts:
        for template in book.templates:
            prompt = template.format(country=fact.country)
            prompt = prompt[0].upper() + prompt[1:]
            right, wrong = counts[f"{prompt} {fact.capital}"], counts[f"{prompt} {fact.wrong}"]
            assert right + wrong == book.mentions
            assert wrong / book.mentions == pytest.approx(book.wrong_rate)
    assert 0 < book.wrong_rate < 0.5  # the right answer stays the majority, so SFT prefers it a little


def test_held_out_prompts_never_reach_dpo(book):
    train, held_out = pairs(book, book.dpo_templates), pairs(book, book.held_out_templates)
    assert len(train) == len(book.facts) * len(book.dpo_templates)
    assert len(held_out) == len(book.facts) * len(book.held_out_templates)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held_out}
    assert not set(book.dpo_templates) & set(book.held_out_templates)
    capitals = {f.capital for f in book.facts}
    assert all(p["chosen"].strip() in capitals and p["rejected"].strip() not in capitals for p in held_out)


def test_corpus_is_deterministic_and_small(book, tmp_path):
    assert sft_texts(book, seed=0) == sft_texts(book, seed=0)
    assert sft_texts(book, seed=0) != sft_texts(book, seed=1)
    a = write_demo_data(book, tmp_path / "a")
    b = write_demo_data(book, tmp_path / "b")
    for x, y in ((a.sft, b.sft), (a.dpo, b.dpo), (a.held_out, b.held_out)):
        assert x.read_bytes() == y.read_bytes()
    from importlib import resources

    assert len(resources.files("preftune.demo").joinpath("facts.json").read_bytes()) < 200_000


def test_answers_tokenise_the_same_inside_a_sentence_and_after_a_prompt(book):
    # SFT sees whole sentences, DPO sees prompt + answer: the answer's tokens must be the same in both.
    tok = train_tokenizer(sft_texts(book), vocab_size=1024)
    for p in pairs(book, book.templates):
        for answer in (p["chosen"], p["rejected"]):
            whole = tok(p["prompt"] + answer)["input_ids"]
            assert whole == tok(p["prompt"])["input_ids"] + tok(answer, add_special_tokens=False)["input_ids"]
            assert whole[0] == tok.bos_token_id


def test_output_folder_rules(tmp_path):
    check_out(tmp_path / "new")                      # missing: fine
    check_out(tmp_path)                              # empty: fine
    (tmp_path / PLAN).write_text("{}")
    (tmp_path / "sft").mkdir()
    check_out(tmp_path)                              # an interrupted demo is started afresh
    (tmp_path / SUMMARY).write_text("{}")
    check_out(tmp_path)                              # a finished one is shown again (run_demo), not refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(PreftuneError, match="not empty and holds no demo"):
        check_out(other)
    with pytest.raises(PreftuneError, match="not a folder"):
        check_out(other / "notes.txt")


def test_a_partial_summary_counts_as_unfinished(tmp_path):
    from preftune.demo.run import _finished

    (tmp_path / SUMMARY).write_text("{}")
    assert _finished(tmp_path) is None
    whole = {"total_seconds": 3.0, "sft": {"p_chosen": 0.5, "p_rejected": 0.4},
             "dpo": {"p_chosen": 0.7, "p_rejected": 0.2, "reward_accuracy": 1.0}}
    (tmp_path / SUMMARY).write_text(json.dumps(whole))
    assert _finished(tmp_path) == whole


def test_the_online_judge_knows_each_capital():
    from preftune.demo.corpus import load_facts, prompt_text
    from preftune.demo.online import capital_judge

    book = load_facts()
    judge = capital_judge(book)
    fact = book.facts[0]
    for template in book.templates:
        prompt = prompt_text(template, fact)
        # Exact: the capital and nothing more (more words after it would let online DPO game the rule).
        assert judge(prompt, [f" {fact.capital}", f"{fact.capital} ", f" {fact.wrong}", "",
                              f" {fact.capital} and more"]) == [1.0, 1.0, 0.0, 0.0, 0.0]
