"""Prompt and answer -> token ids, untruncated, by the convention TRL uses so that numbers compare (README.md,
"Data").

Text:  prompt ids = tokenizer(prompt) with the tokenizer's own special tokens;
       answer ids = tokenizer(answer, add_special_tokens=False) + [eos] (not when it already ends with EOS).
Chat:  prompt = chat template of the prompt turns with the generation prompt; answer = the template of the whole
       conversation minus the rendered prompt, its ids taken in context (the whole conversation's ids past the
       prompt's, as TRL 1.16 cuts them). The template alone decides the special tokens, as
       `apply_chat_template(tokenize=True)` and TRL do: no BOS or EOS is added to what it writes (a template that
       writes no BOS gets none, and a turn that ends with <|im_end|> is not followed by a different EOS).
       A tokenizer without a chat template gets the Human/Assistant transcript of HH-RLHF instead, tokenised as
       text (its own special tokens, EOS after the answer).
"""

from __future__ import annotations

import logging
import os

from ..errors import DataError
from .fields import hh_transcript
from .records import Content, Messages
from .rows import NOT_TRAINED

log = logging.getLogger("preftune")


def _messages(system: str | None, turns: Content) -> list[dict]:
    # An empty system turn is kept: it is how a record keeps a template's default system prompt out.
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + list(turns)


_SAID: set[str] = set()  # warnings of this module already given in this process


def say_once(key: str, message: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        log.warning(message)


def _chat_template(tokenizer, messages, *, generation_prompt: bool, where: str, tools=None,
                   template_kwargs=None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt, **(template_kwargs or {}))
    except Exception as exc:  # templates raise their own errors for odd role orders
        raise DataError(f"{where}: the chat template rejected these messages ({exc})") from None


def _plain_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def has_template(tokenizer) -> bool:
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


def _uses_tools(turns: Messages, tools) -> bool:
    return bool(tools) or any(t["role"] == "tool" or t.get("tool_calls") for t in turns)


def _renderer(tokenizer, system: str | None, tools, turns: Messages, where: str, template_kwargs=None):
    """`render(turns, generation_prompt) -> text`: the chat template (given the record's `chat_template_kwargs`
    too), or the Human/Assistant transcript when the tokenizer has none. Tool calls and tool schemas need a
    template that knows them."""
    if has_template(tokenizer):
        head = _messages(system, [])

        def render(part: Messages, generation_prompt: bool) -> str:
            if not head and not part:
                return ""
            return _chat_template(tokenizer, head + list(part), generation_prompt=generation_prompt, where=where,
                                  tools=tools, template_kwargs=template_kwargs)
        return render
    if template_kwargs:
        say_once("transcript kwargs", f"{where}: chat_template_kwargs are not used: the tokenizer has no chat "
                                      "template, so chat data is written as Human/Assistant transcripts")
    if _uses_tools(turns, tools):
        raise DataError(f"{where}: this record has tool calls or tool schemas, and the tokenizer has no chat "
                        "template to render them; use a model whose chat template supports tools")
    odd = next((t["role"] for t in turns if t["role"] not in ("user", "assistant")), None)
    if odd is not None:  # a transcript has a speaker for user and assistant turns only
        raise DataError(f"{where}: a {odd!r} turn inside the conversation has no Human/Assistant transcript form, "
                        "and the tokenizer has no chat template; use a model whose chat template renders it, or "
                        "give the system prompt as the conversation's first turn")
    say_once("transcript", "the tokenizer has no chat template: chat data is written as Human/Assistant "
                            "transcripts")
    return lambda part, generation_prompt: hh_transcript(part, system) + (
        "\n\nAssistant:" if generation_prompt else "")


def _check_tools_rendered(text: str, turns: Messages, tools, where: str) -> None:
    """A template without tool support silently leaves tools out: refuse rather than train on a lie."""
    wanted = [("tool schema", t.get("function", t)["name"]) for t in tools or []]
    for turn in turns:
        wanted += [("tool call", call["function"]["name"]) for call in turn.get("tool_calls", [])]
        if turn["role"] == "tool":
            wanted.append(("tool result", turn["content"]))
    for what, piece in wanted:
        if piece not in text:
            raise DataError(f"{where}: the chat template does not render this {what} ({piece!r:.40} is missing from "
                            "its output), so it has no tool support; use a model whose chat template supports tools")


def encode_prompt(tokenizer, prompt: Content, system: str | None = None, where: str = "", tools=None,
                  template_kwargs=None) -> list[int]:
    """Prompt ids exactly as training sees them (chat prompts end with the generation prompt)."""
    if isinstance(prompt, list):
        render = _renderer(tokenizer, system, tools, prompt, where, template_kwargs)
        text = render(prompt, True)
        if _uses_tools(prompt, tools) and has_template(tokenizer):
            _check_tools_rendered(text, prompt, tools, where)
        return _rendered_prompt_ids(tokenizer, text)
    return tokenizer(f"{system}\n\n{prompt}" if system else prompt)["input_ids"]


def _rendered_prompt_ids(tokenizer, text: str) -> list[int]:
    """A rendered chat prompt's ids: a template's output as it is (it writes its own BOS, if any); a transcript
    (no template) as text, with the tokenizer's own special tokens."""
    if has_template(tokenizer):
        return _plain_ids(tokenizer, text) if text else []
    return tokenizer(text)["input_ids"]


def _pieces(render, prompt: Messages, answer: Messages, full: str, start: int, every_turn: bool, where: str,
            closing=lambda: ""):
    """The answer text cut into (text, trained) pieces. With `every_turn`, each assistant turn is trained (from
    just after its generation prompt to the end of its turn) and the other turns in between are not."""
    if not every_turn:
        return [(full[start:], True)]
    cuts, turns = [], list(prompt)  # (offset in `full`, whether an assistant turn starts there)
    for turn in answer:
        opened = None
        if turn["role"] == "assistant":
            opened = _answer_start(render, turns, render(turns, True), full, where)
            cuts.append((opened, not turn.get(NOT_TRAINED)))  # a turn its data marks weight 0 is context
        turns.append(turn)
        cuts.append((_offset(render(turns, False), full, where, closing, opened, turn), False))
    pieces, at, trained = [], start, False
    for end, opens in cuts:
        if end > at:
            pieces.append((full[at:end], trained))
            at = end
        trained = opens
    if at < len(full):
        pieces.append((full[at:], False))
    return pieces


CLOSING = 32  # characters: the longest text a template may write only at a conversation's end (an EOS token)


def _closing(tokenizer, template_kwargs=None) -> str:
    """What the chat template writes for no messages at all, when that is short: the text it closes every
    conversation with (Phi-3 writes EOS when no generation prompt follows); "" when none or not found."""
    try:  # apply_chat_template refuses an empty conversation; the renderer under it does not
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=[[]], chat_template=tokenizer.chat_template,
                                            add_generation_prompt=False,
                                            **{**tokenizer.special_tokens_map, **(template_kwargs or {})})
        text = rendered[0]
    except Exception:  # an older transformers, or a template that cannot render no messages
        return ""
    return text if isinstance(text, str) and len(text) <= CLOSING else ""


def _offset(prefix: str, full: str, where: str, closing=lambda: "", begin: int | None = None,
            turn: dict | None = None) -> int:
    """Where the turns rendered as `prefix` end inside the whole conversation `full`. A template that closes
    every conversation with the text `closing()` gives (asked only then) writes it after `prefix` too, and in
    `full` only at the end: the turns end where it begins. `prefix` ending with the assistant `turn` that starts
    at `begin` in both may also write that turn with text in front that only a conversation's last turn gets
    (`_last_turn_head`)."""
    if full.startswith(prefix):
        return len(prefix)
    closing = closing()
    if closing and prefix.endswith(closing) and full.endswith(closing) and \
            full.startswith(prefix[:len(prefix) - len(closing)]):
        return len(prefix) - len(closing)
    end = _last_turn_head(prefix, full, begin, turn) if begin is not None else None
    if end is not None:
        return end
    raise DataError(f"{where}: the chat template renders the earlier turns differently inside the whole "
                    "conversation, so the assistant turns cannot be located; check the template or the roles")


def _last_turn_head(prefix: str, full: str, begin: int, turn: dict | None) -> int | None:
    """The end in `full` of an assistant turn that the template writes with more text in front when the turn
    ends the conversation (`prefix`) than inside it: Qwen3 gives only the last turn its think block, empty or
    not, and leaves the reasoning of earlier turns out. Inside the conversation the turn is the longest tail of
    its last-turn form that `full` has at `begin`, provided that tail holds the turn's answer text (said once).
    None when there is no such tail."""
    if begin > len(prefix) or prefix[:begin] != full[:begin]:
        return None
    alone = prefix[begin:]
    content = turn.get("content") if turn else None
    answer = content.rsplit("</think>", 1)[-1].strip() if isinstance(content, str) else ""
    for cut in range(1, len(alone)):
        tail = alone[cut:]
        if full.startswith(tail, begin) and answer in tail and tail.strip():
            say_once("last turn head", f"the chat template writes {alone[:cut]!r:.60} before an assistant turn only "
                                        f"when it ends the conversation; earlier assistant turns are trained as "
                                        f"the whole conversation writes them, without it")
            return begin + len(tail)
    return None


def _answer_start(render, turns: Messages, prompt_text: str, full_text: str, where: str,
                  assistant_next: bool = True) -> int:
    """Where the answer starts in the rendered conversation: after the rendered prompt. Some templates end their
    generation prompt with text a finished turn does not keep (DeepSeek-R1's "<think>\n"): then the answer starts
    where the two part, as TRL cuts, provided the prompt's turns themselves render the same inside the whole
    conversation and an assistant turn comes next (`assistant_next`: the turn the generation prompt opens; said
    once). Otherwise (a system turn rendered only when the prompt ends the conversation) the answer cannot be
    located: refused."""
    if full_text.startswith(prompt_text):
        return len(prompt_text)
    bare = render(turns, False) if turns else ""
    start = len(os.path.commonprefix([prompt_text, full_text]))
    if not assistant_next or not full_text.startswith(bare) or start < len(bare):
        raise DataError(f"{where}: the chat template renders the prompt differently inside the whole "
                        f"conversation, so the answer cannot be separated; check the template or the roles")
    say_once("generation prompt", f"the chat template's generation prompt ends with {prompt_text[start:]!r}, "
                                   f"which a finished conversation does not keep; answers start where the two "
                                   f"part (as TRL cuts them)")
    return start


def _in_context(tokenizer, prompt_text: str, full_text: str, start: int,
                pieces) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, answer ids, answer mask) of a rendered conversation, its answer tokenised in context: the ids
    of the whole conversation past those of the rendered prompt, as TRL 1.16 and `apply_chat_template` give
    them. Tokenised alone, an answer can take other ids (a sentencepiece tokenizer starts it with a word
    boundary "▁" where the conversation has none, after a newline). Where the prompt's last ids merge with the
    answer's first, the prompt ends where the two sequences part (TRL's cut). A token is trained when the piece
    its first character lies in is (`pieces`: the answer text from `start` as (text, trained), in order)."""
    whole = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = whole["input_ids"], whole["offset_mapping"]
    alone = _plain_ids(tokenizer, prompt_text) if prompt_text else []
    cut = next((i for i, (a, b) in enumerate(zip(alone, ids)) if a != b), min(len(alone), len(ids)))
    ends, at = [], start
    for text, trained in pieces:
        at += len(text)
        ends.append((at, trained))
    mask = [int(next((trained for end, trained in ends if begin < end), ends[-1][1] if ends else True))
            for begin, _ in offsets[cut:]]
    return ids[:cut], ids[cut:], mask


def encode_prompt_answer(tokenizer, prompt: Content | None, answer: Content, system: str | None = None,
                         where: str = "", tools=None, template_kwargs=None) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) for one prompt/answer, untruncated. `prompt=None` means no prompt (SFT on text)."""
    return encode_masked(tokenizer, prompt, answer, system, where, tools, template_kwargs=template_kwargs)[:2]


def encode_masked(tokenizer, prompt: Content | None, answer: Content, system: str | None = None,
                  where: str = "", tools=None, every_turn: bool = False, template_kwargs=None):
    """(prompt ids, answer ids, answer mask) for one prompt/answer, untruncated. `prompt=None` means no prompt
    (SFT on text). The mask marks the answer tokens in the loss; None means all of them. It only has zeros for
    a chat answer of several turns with `every_turn`: the user and tool turns between assistant turns."""
    eos = tokenizer.eos_token_id
    if isinstance(answer, list):
        turns = list(prompt or [])
        render = _renderer(tokenizer, system, tools, turns + list(answer), where, template_kwargs)
        full_text = render(turns + list(answer), False)
        prompt_text = render(turns, True)
        if _uses_tools(turns + list(answer), tools) and has_template(tokenizer):
            _check_tools_rendered(full_text, turns + list(answer), tools, where)
        start = _answer_start(render, turns, prompt_text, full_text, where,
                              assistant_next=bool(answer) and answer[0].get("role") == "assistant")
        pieces = _pieces(render, turns, list(answer), full_text, start, every_turn, where,
                         lambda: _closing(tokenizer, template_kwargs) if has_template(tokenizer) else "")
        if has_template(tokenizer) and getattr(tokenizer, "is_fast", False):
            prompt_ids, answer_ids, mask = _in_context(tokenizer, prompt_text, full_text, start, pieces)
            return prompt_ids, answer_ids, (None if all(mask) else mask)
        prompt_text = full_text[:start]
        prompt_ids = _rendered_prompt_ids(tokenizer, prompt_text)
        answer_ids, mask = [], []
        for text, trained in pieces:
            ids = _plain_ids(tokenizer, text)
            answer_ids += ids
            mask += [int(trained)] * len(ids)
        eos_text = tokenizer.eos_token
        if (eos is not None and not has_template(tokenizer)
                and not (eos_text and full_text[len(prompt_text):].rstrip().endswith(eos_text))):
            answer_ids.append(eos)  # a transcript's answer ends like a text answer
            mask.append(1)
        return prompt_ids, answer_ids, (None if all(mask) else mask)
    if prompt is None:
        ids = _with_eos(tokenizer, tokenizer(answer)["input_ids"])
        return ids[:1], ids[1:], None
    return encode_prompt(tokenizer, prompt, system, where), text_answer_ids(tokenizer, answer), None


def text_answer_ids(tokenizer, answer: str) -> list[int]:
    """A text answer's ids: the text without special tokens, then EOS unless the text already ends with it (as
    TRL adds it: once)."""
    return _with_eos(tokenizer, _plain_ids(tokenizer, answer))


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and ids[-1:] != [eos] else ids
