"""The demo's data, built deterministically from the bundled `facts.json`.

Every fact is stated in every template. In the SFT corpus a fixed share of the mentions (`wrong_rate`) names the
plausible wrong city, so supervised training learns the mixture, as it would from real text. Preference pairs
(chosen = the capital, rejected = the wrong city) use only the DPO templates; the held-out templates are never
shown to DPO, so held-out pairs measure whether "prefer the right fact" transfers to phrasings it never saw.

Answers are the bare city (" Dublin", then EOS), no closing period: a token that ends both the chosen and the
rejected answer is one DPO can push down after wrong cities, and with a period it also fell after right cities in
the held-out phrasings (held-out p(chosen) dropped from 0.69 to 0.01 for some facts, measured).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..io import write_jsonl


@dataclass(frozen=True)
class Fact:
    country: str
    capital: str
    wrong: str


@dataclass(frozen=True)
class FactBook:
    facts: list[Fact]
    dpo_templates: list[str]
    held_out_templates: list[str]
    answer: str          # answer format, e.g. " {city}."
    wrong_rate: float    # share of a fact's mentions that name the wrong city
    mentions: int        # times each (fact, template) appears in the SFT corpus

    @property
    def templates(self) -> list[str]:
        return self.dpo_templates + self.held_out_templates


def load_facts() -> FactBook:
    raw = json.loads(resources.files(__package__).joinpath("facts.json").read_text(encoding="utf-8"))
    return FactBook([Fact(**f) for f in raw["facts"]], raw["dpo_templates"], raw["held_out_templates"],
                    raw["answer"], raw["wrong_rate"], raw["mentions"])


def prompt_text(template: str, fact: Fact) -> str:
    text = template.format(country=fact.country)
    return text[0].upper() + text[1:]  # "the United States has ..." opens a sentence


def answer_text(book: FactBook, city: str) -> str:
    return book.answer.format(city=city)


def sft_texts(book: FactBook, seed: int = 0) -> list[str]:
    """The mixture corpus, shuffled by `seed`: each (fact, template) `mentions` times, round(wrong_rate *
    mentions) of them with the wrong city. Length: facts x templates x mentions."""
    n_wrong = round(book.wrong_rate * book.mentions)
    texts = []
    for fact in book.facts:
        for template in book.templates:
            prompt = prompt_text(template, fact)
            texts += [prompt + answer_text(book, fact.wrong)] * n_wrong
            texts += [prompt + answer_text(book, fact.capital)] * (book.mentions - n_wrong)
    random.Random(seed).shuffle(texts)
    return texts


def pairs(book: FactBook, templates: list[str]) -> list[dict[str, str]]:
    """Preference pairs {prompt, chosen, rejected}, one per (fact, template), facts in book order."""
    return [{"prompt": prompt_text(t, f), "chosen": answer_text(book, f.capital),
             "rejected": answer_text(book, f.wrong)}
            for t in templates for f in book.facts]


@dataclass(frozen=True)
class DemoData:
    sft: Path        # {"text": ...} per line
    dpo: Path        # pairs in the DPO templates
    held_out: Path   # pairs in the held-out templates


def write_demo_data(book: FactBook, out_dir: Path, seed: int = 0) -> DemoData:
    """Write the three jsonl files the demo trains and evaluates on."""
    data = DemoData(out_dir / "sft.jsonl", out_dir / "dpo_pairs.jsonl", out_dir / "held_out_pairs.jsonl")
    write_jsonl(data.sft, ({"text": t} for t in sft_texts(book, seed)))
    write_jsonl(data.dpo, pairs(book, book.dpo_templates))
    write_jsonl(data.held_out, pairs(book, book.held_out_templates))
    return data
