"""Pairs from judged groups: each prompt's best answer against its worst; a group whose scores are all equal
gives no pair and is counted. An empty answer to a text prompt (the policy ended at once) cannot be trained on,
and an answer cut off at --max-new-tokens is not one the policy gave (trained, it would end with EOS where the cut
fell): both are judged and counted but never paired."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class RoundPairs:
    """The pairs of one round and what the judging of its samples looked like."""

    pairs: list[dict]        # {prompt, chosen, rejected, system?, chat_template_kwargs?, score_chosen, score_rejected,
    #                          prompt_index}
    groups: int              # prompts judged
    tied_groups: int         # prompts skipped: best and worst scored the same (all answers equal)
    score_mean: float        # over every sample of every prompt
    score_std: float         # population standard deviation of the same
    empty_answers: int = 0   # empty answers to text prompts: judged, never paired
    short_groups: int = 0    # prompts skipped: fewer than two answers that could be paired
    cut_answers: int = 0     # answers that reached --max-new-tokens without ending: judged, never paired

    @property
    def pair_share(self) -> float:
        return len(self.pairs) / self.groups if self.groups else 0.0


def best_vs_worst(prompts: list[dict], answers: list[list[str]], scores: list[list[float]],
                  ended: list[list[bool]] | None = None, *, pair_cut: bool = False) -> RoundPairs:
    """One pair per prompt whose answers do not all score the same: the first highest-scoring answer chosen, the
    first lowest-scoring one whose text differs from it rejected (a noisy judge scores the same answer twice
    differently; no such answer counts as a tie). `prompts[i]` is a prompt record ({prompt, system?}); `answers[i]` and
    `scores[i]` its samples and their scores; `ended[i]` whether each ended (None: all did). Cut-off answers are
    counted, and paired only with `pair_cut`."""
    pairs, tied, empty, short, cut = [], 0, 0, 0, 0
    for i, (record, group, group_scores) in enumerate(zip(prompts, answers, scores)):
        whole = [j for j in range(len(group)) if ended is None or ended[i][j]]
        cut += len(group) - len(whole)
        whole = list(range(len(group))) if pair_cut else whole
        usable = [j for j in whole if isinstance(record["prompt"], list) or group[j].strip()]
        empty += len(whole) - len(usable)
        if len(usable) < 2:
            short += 1
            continue
        hi = max(usable, key=lambda j: (group_scores[j], -j))
        others = [j for j in usable if group[j] != group[hi]]  # the same answer scored twice is no preference
        lo = min(others, key=lambda j: (group_scores[j], j)) if others else hi
        if group_scores[hi] == group_scores[lo]:
            tied += 1
            continue
        pair = {"prompt": record["prompt"], "chosen": _answer(record, group[hi]),
                "rejected": _answer(record, group[lo])}
        if record.get("system") is not None:
            pair["system"] = record["system"]
        if record.get("template_kwargs"):  # the template arguments it was sampled with, for training on it too
            pair["chat_template_kwargs"] = record["template_kwargs"]
        pair.update(score_chosen=group_scores[hi], score_rejected=group_scores[lo], prompt_index=i)
        pairs.append(pair)
    flat = [s for group_scores in scores for s in group_scores]
    mean = statistics.fmean(flat) if flat else 0.0
    std = statistics.pstdev(flat) if flat else 0.0
    return RoundPairs(pairs, len(prompts), tied, mean, std, empty, short, cut)


def training_record(pair: dict) -> dict:
    """A pair as the DPO stage reads it: prompt, chosen, rejected (and system); the scores stay in pairs.jsonl."""
    return {k: pair[k] for k in ("prompt", "chosen", "rejected", "system", "chat_template_kwargs") if k in pair}


def _answer(record: dict, text: str):
    """An answer in the prompt's shape: text for a text prompt, one assistant turn for a message-list prompt."""
    return [{"role": "assistant", "content": text}] if isinstance(record["prompt"], list) else text
