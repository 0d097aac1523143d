"""Records -> token ids for training: pairs and SFT examples, encoded by encode.py (the TRL convention), then cut.

Truncation: prompts lose tokens from the left (the latest turns survive), answers from the right; a pair whose
prompt alone leaves no room for an answer token is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .encode import (encode_masked, encode_prompt, encode_prompt_answer, has_template, say_once, text_answer_ids,
                     transcript)
from ..errors import DataError
from .records import PreferencePair, SFTExample, UnpairedExample
from .rows import require_trained


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    index: int = 0  # position in the dataset, for reporting and for the reference cache
    cut: tuple[bool, ...] = (False, False, False)  # which of prompt, chosen, rejected were truncated


@dataclass
class TokenizedExample:
    """An SFT example: loss on `answer_ids` where `answer_mask` is 1 (None: all of them), each token predicted
    from everything before it. The mask has zeros only for the user/tool turns between assistant turns."""

    prompt_ids: list[int]
    answer_ids: list[int]
    truncated: bool = False
    index: int = 0
    answer_mask: list[int] | None = None


@dataclass
class TokenizedUnpaired:
    """A KTO example: the prompt with its own rated answer and a mismatched answer for the KL estimate.

    `kl_ids` is the answer of another example (see `assign_kl_answers`): the policy and reference log-probs of
    prompt + `kl_ids` estimate the KL term, as TRL's KTOTrainer does. `label` True = desirable."""

    prompt_ids: list[int]
    completion_ids: list[int]
    kl_ids: list[int]
    label: bool
    truncated: bool = False
    index: int = 0
    cut: tuple[bool, ...] = (False, False, False)  # which of prompt, completion, KL answer were truncated


def text_form(pair: PreferencePair) -> PreferencePair:
    """A pair whose turns came from text fields (orca, alpaca), written back as text: one user turn is the
    prompt text itself (the system before it, as a text record has it); earlier turns make a transcript."""
    if pair.template_kwargs:
        say_once("text kwargs", f"{pair.where}: chat_template_kwargs are not used: records written as text fields "
                                "are fed as text (--raw-text-prompts, or a tokenizer without a chat template)")
    chosen, rejected = pair.chosen[0]["content"], pair.rejected[0]["content"]
    if len(pair.prompt) == 1:
        return PreferencePair(pair.prompt[0]["content"], chosen, rejected, pair.system, pair.where)
    head = transcript(pair.system, pair.prompt)[0]
    return PreferencePair(head, " " + chosen, " " + rejected, None, pair.where)


def _fit(prompt: list[int], answers: Sequence[list[int]], max_length: int, max_prompt_length: int | None):
    """Cut the prompt from the left and answers from the right; None when the prompt leaves no answer room.
    Returns (prompt, answers, which were cut: prompt first, then each answer)."""
    cut_prompt = max_prompt_length is not None and len(prompt) > max_prompt_length
    if cut_prompt:
        prompt = prompt[len(prompt) - max_prompt_length:]
    room = max_length - len(prompt)
    if room < 1:
        return None
    flags = (cut_prompt,) + tuple(len(answer) > room for answer in answers)
    return prompt, [answer[:room] for answer in answers], flags


def prompt_ids_of(tokenizer, pair: PreferencePair, *, raw_text_prompts: bool = False) -> list[int]:
    """The prompt ids of a pair exactly as training sees them (before truncation): system, tools and text fields
    treated as `tokenize_pair` treats them. For generating answers to the prompts of a data file."""
    if pair.text_fields and (raw_text_prompts or not has_template(tokenizer)):
        pair = text_form(pair)
    return encode_prompt(tokenizer, pair.prompt, pair.system, pair.where, pair.tools, pair.template_kwargs)


def _require_prompt(ok, where: str, what: str) -> None:
    """An empty prompt and no BOS token leave an answer's first token nothing to be predicted from."""
    if not ok:
        raise DataError(f"{where}: the prompt is empty and the tokenizer adds no BOS token, so {what} have nothing "
                        f"to be predicted from; give the record a prompt")


def _require_tokens(answer_ids, where: str, name: str) -> None:
    """An answer of no tokens at all (not even an end of turn) means the chat template leaves it out."""
    if not answer_ids:
        raise DataError(f"{where}: the {name} answer renders as no tokens at all, so there is nothing to train "
                        f"on; the chat template leaves the assistant turn out (a template for prompts only?): use "
                        f"one that writes assistant turns")


def tokenize_pair(tokenizer, pair: PreferencePair, *, max_length: int, max_prompt_length: int | None = None,
                  index: int = 0, raw_text_prompts: bool = False) -> TokenizedPair | None:
    """Token ids of one preference pair, or None when its prompt alone does not fit in `max_length`.

    Turns that came from text fields (orca, alpaca) go through the chat template when the tokenizer has one,
    and are written back as text with `raw_text_prompts` or without a template."""
    require_trained(pair.chosen, pair.where)
    require_trained(pair.rejected, pair.where)
    if pair.text_fields and (raw_text_prompts or not has_template(tokenizer)):
        pair = text_form(pair)
    if isinstance(pair.prompt, str) and isinstance(pair.chosen, str) and isinstance(pair.rejected, str):
        # Text: the prompt's ids do not depend on the answer, so it is encoded once for both.
        prompt_ids = encode_prompt(tokenizer, pair.prompt, pair.system, pair.where)
        chosen, rejected = text_answer_ids(tokenizer, pair.chosen), text_answer_ids(tokenizer, pair.rejected)
    else:
        for_chosen, chosen = encode_prompt_answer(tokenizer, pair.prompt, pair.chosen, pair.system, pair.where,
                                                  pair.tools, pair.template_kwargs)
        for_rejected, rejected = encode_prompt_answer(tokenizer, pair.prompt, pair.rejected, pair.system,
                                                      pair.where, pair.tools, pair.template_kwargs)
        # Each answer's prompt ends where its ids part from the prompt's own (usually both whole): the shorter
        # is the pair's, and the other's rest goes to its answer, as TRL cuts.
        n = min(len(for_chosen), len(for_rejected))
        prompt_ids, chosen, rejected = for_chosen[:n], for_chosen[n:] + chosen, for_rejected[n:] + rejected
    _require_tokens(chosen, pair.where, "chosen")
    _require_tokens(rejected, pair.where, "rejected")
    if not prompt_ids:
        # TRL never scores a sequence's first token: a first token both answers share becomes the prompt.
        _require_prompt(chosen[:1] and chosen[:1] == rejected[:1], pair.where, "the answers' first tokens")
        prompt_ids, chosen, rejected = chosen[:1], chosen[1:], rejected[1:]
    fitted = _fit(prompt_ids, (chosen, rejected), max_length, max_prompt_length)
    if fitted is None:
        return None
    prompt_ids, (chosen, rejected), cut = fitted
    return TokenizedPair(prompt_ids, chosen, rejected, any(cut), index, cut)


def tokenize_example(tokenizer, example: SFTExample, *, max_length: int, max_prompt_length: int | None = None,
                     index: int = 0, last_turn_only: bool = False, raw_text_prompts: bool = False,
                     scored_whole: bool = False) -> TokenizedExample | None:
    """Token ids of one SFT example. A conversation trains on every assistant turn after the prompt; with
    `last_turn_only`, on the last one alone (the turns before it become the prompt). A one-turn answer whose
    turns came from text fields (alpaca) is written back as text as `tokenize_pair` does it; with history, the
    turns go through the template, or the Human/Assistant transcript without one. `scored_whole`: the example is
    scored as one text (a reward model's), not trained on, so a template's header inside the answer is no harm."""
    single_turn = isinstance(example.completion, list) and len(example.completion) == 1
    if example.text_fields and single_turn and (raw_text_prompts or not has_template(tokenizer)):
        # The pair's text form, with the output as both answers: one rule for preference and SFT records.
        as_pair = text_form(PreferencePair(example.prompt, example.completion, example.completion, example.system,
                                           example.where, template_kwargs=example.template_kwargs))
        example = SFTExample(as_pair.chosen, as_pair.prompt, as_pair.system, example.where)
    prompt, completion = example.prompt, example.completion
    if last_turn_only and isinstance(completion, list):
        prompt, completion = list(prompt or []) + completion[:-1], completion[-1:]
    prompt_ids, answer, mask = encode_masked(tokenizer, prompt, completion, example.system, example.where,
                                             example.tools, every_turn=True,
                                             template_kwargs=example.template_kwargs)
    if answer and mask is not None and not any(mask):
        raise DataError(f"{example.where}: every assistant turn it would train is marked not to be (weight 0 or loss "
                        f"false), so there is nothing to train on; fix the marks, or leave the record out")
    _require_tokens(answer if mask is None or any(mask) else [], example.where, "trained")
    if not prompt_ids and answer and isinstance(completion, list) and completion[0]["role"] == "assistant" \
            and not scored_whole:
        # A chat template renders nothing before a conversation's first turn: its own header would be trained.
        raise DataError(f"{example.where}: the conversation has no turn before its first assistant turn, and the "
                        "chat template writes the assistant's header as part of it, which would be trained as "
                        "answer; start the conversation with the user's (or a system) turn, or leave the record out")
    if not prompt_ids and answer:  # as for SFT on text (and in TRL): the first token is the prompt, never scored
        prompt_ids, answer, mask = answer[:1], answer[1:], None if mask is None else mask[1:]
    fitted = _fit(prompt_ids, (answer,), max_length, max_prompt_length)
    if fitted is None:
        return None
    prompt_ids, (answer,), cut = fitted
    return TokenizedExample(prompt_ids, answer, any(cut), index, None if mask is None else mask[:len(answer)])


def assign_kl_answers(encoded: list[tuple[list[int], list[int]]], chunk: int) -> list[list[int]]:
    """For each (prompt ids, answer ids), in order, the answer its KL sequence uses: within consecutive chunks of
    `chunk` examples, the previous example's answer (the first takes the chunk's last), as TRL's KTOTrainer
    rotates completions by one within each batch of `per_device_train_batch_size`."""
    answers = [answer for _, answer in encoded]
    out = []
    for start in range(0, len(answers), chunk):
        part = answers[start:start + chunk]
        out += part[-1:] + part[:-1]
    return out


def encode_unpaired(tokenizer, ex: UnpairedExample, raw_text_prompts: bool = False) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one KTO example, untruncated."""
    require_trained(ex.completion, ex.where)
    prompt, completion, system = ex.prompt, ex.completion, ex.system
    if ex.text_fields and (raw_text_prompts or not has_template(tokenizer)):
        pair = text_form(PreferencePair(prompt, completion, completion, system, ex.where,
                                        template_kwargs=ex.template_kwargs))
        prompt, completion, system = pair.prompt, pair.chosen, pair.system
    prompt_ids, answer = encode_prompt_answer(tokenizer, prompt, completion, system, ex.where, ex.tools,
                                              ex.template_kwargs)
    _require_tokens(answer, ex.where, "rated")
    _require_prompt(prompt_ids, ex.where, "its answer's first token and its KL answer's")
    return prompt_ids, answer


def tokenize_unpaired_all(tokenizer, examples: Sequence[UnpairedExample], *, max_length: int,
                          max_prompt_length: int | None = None, raw_text_prompts: bool = False,
                          kl_chunk: int = 8):
    """Tokenise KTO examples: (list of `TokenizedUnpaired`, stats). Examples whose prompt alone does not fit are
    dropped first; the KL answers are then assigned among the kept ones (`assign_kl_answers`), untruncated, and
    the prompt, answer and KL answer are cut together to fit."""
    encoded, kept = [], []
    for i, ex in enumerate(examples):
        prompt_ids, answer = encode_unpaired(tokenizer, ex, raw_text_prompts)
        if _fit(prompt_ids, (answer,), max_length, max_prompt_length) is None:
            continue
        encoded.append((prompt_ids, answer))
        kept.append(i)
    stats = TokenizeStats(total=len(examples), dropped=len(examples) - len(kept))
    out = []
    for i, (prompt_ids, answer), kl in zip(kept, encoded, assign_kl_answers(encoded, kl_chunk)):
        prompt_ids, (answer, kl), cut = _fit(prompt_ids, (answer, kl), max_length, max_prompt_length)
        stats.truncated += any(cut[:2])
        out.append(TokenizedUnpaired(prompt_ids, answer, kl, examples[i].label, any(cut[:2]), i, cut))
    return out, stats


@dataclass
class TokenizeStats:
    total: int = 0
    truncated: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "truncated": self.truncated, "dropped": self.dropped}


def tokenize_all(tokenizer, items: Sequence, *, max_length: int, max_prompt_length: int | None = None,
                 raw_text_prompts: bool = False, last_turn_only: bool = False, kl_chunk: int = 8):
    """Tokenise pairs, SFT examples or KTO examples (`kl_chunk`: see `tokenize_unpaired_all`); returns
    (tokenized, stats). Indexes are positions in `items`. parallel.py does the same for pairs and SFT examples in
    worker processes, token_cache.py keeps the result on disk."""
    if items and isinstance(items[0], UnpairedExample):
        return tokenize_unpaired_all(tokenizer, items, max_length=max_length, max_prompt_length=max_prompt_length,
                                     raw_text_prompts=raw_text_prompts, kl_chunk=kl_chunk)
    return tokenize_range(tokenizer, items, 0, max_length=max_length, max_prompt_length=max_prompt_length,
                          raw_text_prompts=raw_text_prompts, last_turn_only=last_turn_only)


def tokenize_range(tokenizer, items: Sequence, start: int, *, max_length: int, max_prompt_length: int | None,
                   raw_text_prompts: bool, last_turn_only: bool):
    """`tokenize_all` of pairs or SFT examples, serially over `items`, whose first one is at dataset position
    `start`."""
    if items and isinstance(items[0], PreferencePair):
        fn, options = tokenize_pair, {"raw_text_prompts": raw_text_prompts}
    else:
        fn, options = tokenize_example, {"last_turn_only": last_turn_only, "raw_text_prompts": raw_text_prompts}
    out, stats = [], TokenizeStats(total=len(items))
    for i, item in enumerate(items, start=start):
        tok = fn(tokenizer, item, max_length=max_length, max_prompt_length=max_prompt_length, index=i, **options)
        if tok is None:
            stats.dropped += 1
            continue
        stats.truncated += tok.truncated
        out.append(tok)
    return out, stats
