"""Held-out accuracy of sampled answers: the share of a model's sampled answers that a judge scores right.

The demo's p(right) / p(wrong) measure the two cities of the offline pairs; this measures what the model says.
Answers are sampled (seeded, so SFT, offline and online DPO are compared on the same random numbers) rather than
decoded greedily, because greedy answers name the right city for every held-out prompt already after SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..online.judges import Judge, judged


@dataclass(frozen=True)
class SampledAnswers:
    """Each prompt's sampled answers and the judge's score of each; an answer is right when it scores 1."""

    prompts: list[str]
    answers: list[list[str]]
    scores: list[list[float]]

    @property
    def right(self) -> int:
        return sum(s == 1.0 for group in self.scores for s in group)

    @property
    def total(self) -> int:
        return sum(len(group) for group in self.scores)

    @property
    def accuracy(self) -> float:
        return self.right / self.total

    def records(self, stage: str) -> list[dict]:
        return [{"stage": stage, "prompt": p, "answers": a, "scores": s}
                for p, a, s in zip(self.prompts, self.answers, self.scores)]


def sample_and_judge(model, tokenizer, prompts: list[str], judge: Judge, *, samples: int, temperature: float,
                     max_new_tokens: int, seed: int, device, batch_size: int = 64) -> SampledAnswers:
    """`samples` answers to each text prompt from `model` (generate.sample_groups, seeded by `seed`), judged."""
    from ..generate import sample_groups

    ids = [tokenizer(p)["input_ids"] for p in prompts]
    groups = sample_groups(model, tokenizer, ids, samples=samples, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=1.0, seed=seed, device=device, batch_size=batch_size)
    scores = [judged(judge, p, group, f"held-out prompt {i + 1} ({p!r})")
              for i, (p, group) in enumerate(zip(prompts, groups))]
    return SampledAnswers(list(prompts), groups, scores)


def sampled_accuracy(model_dir: Path, prompts: list[str], judge: Judge, *, samples: int, temperature: float,
                     max_new_tokens: int, seed: int, device: str = "auto") -> SampledAnswers:
    """`sample_and_judge` with the model and tokenizer saved in `model_dir`."""
    from ..models.load import load_model, load_tokenizer
    from ..models.precision import pick_device, pick_dtype

    dev = pick_device(device)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), device=dev, dtype=pick_dtype("auto", dev))
    return sample_and_judge(model, tokenizer, prompts, judge, samples=samples, temperature=temperature,
                            max_new_tokens=max_new_tokens, seed=seed, device=dev)
