"""The demo's online part: online DPO from the SFT model against the offline DPO run, with the same number of steps.

Prompts are the DPO phrasings of every fact; a rule judge that knows each capital scores a sampled answer 1 when
it is exactly the right city, else 0; each round pairs a right answer against a wrong one where the samples hold
both.
run.py compares the online model with the offline one on the held-out phrasings, by the probability of the right
and of the wrong city, as it compares SFT and DPO.
"""

from __future__ import annotations

from pathlib import Path

from ..online.config import OnlineConfig
from ..online.rounds import run_online
from .corpus import FactBook, prompt_text


def capital_judge(book: FactBook):
    """(prompt, answers) -> 1.0 for each answer that is the prompt's capital and nothing more, else 0.0.

    Exact on purpose: a judge that only asked for the capital at the start was gamed by online DPO within 100
    steps (a third of its held-out answers went on with other words after the city, and were counted right).
    """
    capital = {prompt_text(t, f): f.capital for t in book.templates for f in book.facts}

    def judge(prompt: str, answers: list[str]) -> list[float]:
        return [float(a.strip() == capital[prompt]) for a in answers]

    return judge


def online_run(out: Path, book: FactBook, *, sft_dir: Path, rounds: int, steps: int, samples: int,
               temperature: float, batch_size: int, lr: float, beta: float, seed: int) -> list[dict]:
    """Online DPO from the SFT model into `out`; returns its rows, one a round (round 0: the SFT model). The
    held-out score of a round is the share of held-out prompts whose greedy answer names the right city."""
    judge = capital_judge(book)
    prompts = [prompt_text(t, f) for t in book.dpo_templates for f in book.facts]
    held_out = [prompt_text(t, f) for t in book.held_out_templates for f in book.facts]
    cfg = OnlineConfig.from_dict({
        "model": str(sft_dir), "output_dir": str(out), "judge": "<the capitals>", "prompts": "<the DPO phrasings>",
        "samples": samples, "rounds": rounds, "steps_per_round": steps, "max_new_tokens": 4,
        "temperature": temperature, "generation_batch_size": 64, "overwrite": True, "quiet": True,
        "batch_size": batch_size, "lr": lr, "beta": beta, "seed": seed, "max_length": 64})
    result = run_online(cfg, judge=judge, prompts=prompts, eval_prompts=held_out)
    if result.stopped_at is not None:  # Ctrl-C or SIGTERM: the demo stops too (it has no --resume)
        raise KeyboardInterrupt
    return result.history
