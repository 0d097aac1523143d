"""Records -> token ids, by the convention TRL uses so that numbers compare (README.md, "Data").

Text:  prompt ids = tokenizer(prompt) with the tokenizer's own special tokens;
       answer ids = tokenizer(answer, add_special_tokens=False) + [eos].
Chat:  prompt = chat template of the prompt turns with the generation prompt; answer = the template of the whole
       conversation minus the rendered prompt. BOS is added only when the tokenizer wants one and the template did
       not already write it; EOS is appended only when the rendered answer does not already end with it.

Truncation: prompts lose tokens from the left (the latest turns survive), answers from the right; a pair whose
prompt alone leaves no room for an answer token is dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from ..errors import DataError
from .formats import hh_transcript
from .records import Content, Messages, PreferencePair, SFTExample

log = logging.getLogger("preftune")


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    index: int = 0  # position in the dataset, for reporting and for the reference cache


@dataclass
class TokenizedExample:
    """An SFT example: loss on `answer_ids`, each predicted from everything before it."""

    prompt_ids: list[int]
    answer_ids: list[int]
    truncated: bool = False
    index: int = 0


def _messages(system: str | None, turns: Content) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return head + list(turns)


def _note_transcript() -> None:
    global _TRANSCRIPT_NOTED
    if not _TRANSCRIPT_NOTED:
        _TRANSCRIPT_NOTED = True
        log.warning("the tokenizer has no chat template: chat data is written as Human/Assistant transcripts")


_TRANSCRIPT_NOTED = False


def _chat_template(tokenizer, messages, *, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # templates raise their own errors for odd role orders
        raise DataError(f"{where}: the chat template rejected these messages ({exc})") from None


def _wants_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _plain_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def transcript(system: str | None, prompt: Messages, answer: Messages | None = None) -> tuple[str, str]:
    """Chat turns as plain text for a tokenizer without a chat template (a base model): the Human/Assistant
    transcript of HH-RLHF, which is how such models were trained on it. Returns (prompt text ending in
    "\n\nAssistant:", answer text starting with the space after it)."""
    head = hh_transcript(prompt, system) + "\n\nAssistant:"
    if answer is None:
        return head, ""
    full = hh_transcript(list(prompt) + list(answer), system)
    if not full.startswith(head):
        raise DataError("the answer must start with an assistant turn")
    return head, full[len(head):]


def encode_prompt(tokenizer, prompt: Content, system: str | None = None, where: str = "") -> list[int]:
    """Prompt ids exactly as training sees them (chat prompts end with the generation prompt)."""
    if isinstance(prompt, list) and not _has_template(tokenizer):
        return tokenizer(transcript(system, prompt)[0])["input_ids"]
    if isinstance(prompt, list):
        return _chat_prompt(tokenizer, _messages(system, prompt), where)[0]
    return tokenizer(f"{system}\n\n{prompt}" if system else prompt)["input_ids"]


def _chat_prompt(tokenizer, turns, where: str, full_text: str | None = None) -> tuple[list[int], str]:
    """Rendered prompt ids and text. BOS is added only if the tokenizer wants one and the template (judged on
    `full_text`, the whole conversation, when the prompt is empty) did not write it."""
    text = _chat_template(tokenizer, turns, generation_prompt=True, where=where) if turns else ""
    ids = _plain_ids(tokenizer, text) if text else []
    bos_text = tokenizer.bos_token
    rendered = text or full_text or ""
    if _wants_bos(tokenizer) and not (bos_text and rendered.startswith(bos_text)):
        ids = [tokenizer.bos_token_id] + ids
    return ids, text


def encode_prompt_answer(tokenizer, prompt: Content | None, answer: Content, system: str | None = None,
                         where: str = "") -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) for one prompt/answer, untruncated. `prompt=None` means no prompt (SFT on text)."""
    eos = tokenizer.eos_token_id
    if isinstance(answer, list) and not _has_template(tokenizer):
        _note_transcript()
        try:
            prompt, answer = transcript(system, prompt or [], answer)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        system = None
    if isinstance(answer, list):
        turns = _messages(system, prompt or [])
        full_text = _chat_template(tokenizer, turns + list(answer), generation_prompt=False, where=where)
        prompt_ids, prompt_text = _chat_prompt(tokenizer, turns, where, full_text)
        if not full_text.startswith(prompt_text):
            raise DataError(f"{where}: the chat template renders the prompt differently inside the whole "
                            f"conversation, so the answer cannot be separated; check the template or the roles")
        answer_text = full_text[len(prompt_text):]
        answer_ids = _plain_ids(tokenizer, answer_text)
        eos_text = tokenizer.eos_token
        if eos is not None and not (eos_text and answer_text.rstrip().endswith(eos_text)):
            answer_ids.append(eos)
        return prompt_ids, answer_ids
    if prompt is None:
        ids = tokenizer(answer)["input_ids"] + ([eos] if eos is not None else [])
        return ids[:1], ids[1:]
    prompt_ids = encode_prompt(tokenizer, prompt, system, where)
    answer_ids = _plain_ids(tokenizer, answer) + ([eos] if eos is not None else [])
    return prompt_ids, answer_ids


def _fit(prompt: list[int], answers: Sequence[list[int]], max_length: int, max_prompt_length: int | None):
    """Cut the prompt from the left and answers from the right; None when the prompt leaves no answer room."""
    truncated = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, truncated = prompt[len(prompt) - max_prompt_length:], True
    room = max_length - len(prompt)
    if room < 1:
        return None
    cut = []
    for answer in answers:
        if len(answer) > room:
            answer, truncated = answer[:room], True
        cut.append(answer)
    return prompt, cut, truncated


def tokenize_pair(tokenizer, pair: PreferencePair, *, max_length: int, max_prompt_length: int | None = None,
                  index: int = 0) -> TokenizedPair | None:
    """Token ids of one preference pair, or None when its prompt alone does not fit in `max_length`."""
    prompt_ids, chosen = encode_prompt_answer(tokenizer, pair.prompt, pair.chosen, pair.system, pair.where)
    _, rejected = encode_prompt_answer(tokenizer, pair.prompt, pair.rejected, pair.system, pair.where)
    fitted = _fit(prompt_ids, (chosen, rejected), max_length, max_prompt_length)
    if fitted is None:
        return None
    prompt_ids, (chosen, rejected), truncated = fitted
    return TokenizedPair(prompt_ids, chosen, rejected, truncated, index)


def tokenize_example(tokenizer, example: SFTExample, *, max_length: int, max_prompt_length: int | None = None,
                     index: int = 0) -> TokenizedExample | None:
    prompt_ids, answer = encode_prompt_answer(tokenizer, example.prompt, example.completion, example.system,
                                              example.where)
    fitted = _fit(prompt_ids, (answer,), max_length, max_prompt_length)
    if fitted is None:
        return None
    prompt_ids, (answer,), truncated = fitted
    return TokenizedExample(prompt_ids, answer, truncated, index)


@dataclass
class TokenizeStats:
    total: int = 0
    truncated: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "truncated": self.truncated, "dropped": self.dropped}


def tokenize_all(tokenizer, items: Sequence, *, max_length: int, max_prompt_length: int | None = None):
    """Tokenise pairs or SFT examples; returns (tokenized, stats). Indexes are positions in `items`."""
    fn = tokenize_pair if items and isinstance(items[0], PreferencePair) else tokenize_example
    out, stats = [], TokenizeStats(total=len(items))
    for i, item in enumerate(items):
        tok = fn(tokenizer, item, max_length=max_length, max_prompt_length=max_prompt_length, index=i)
        if tok is None:
            stats.dropped += 1
            continue
        stats.truncated += tok.truncated
        out.append(tok)
    return out, stats
