"""Detect a preference record's format from its keys and normalise it into a `PreferencePair`.

Every format is a function `row -> (pair, score_gap)`; `score_gap` is chosen minus rejected score where the
format carries scores, else None. Field access goes through `Row`, so a missing key or a wrong type becomes a
one-line `DataError` naming the key, the record and the expected type, never a KeyError or TypeError.

HH-RLHF transcripts are kept lossless: each turn's content is the exact text between two `"\\n\\nHuman: "` /
`"\\n\\nAssistant: "` markers (leading and trailing spaces, empty turns and a stray "Human:" inside an answer
included), so `hh_transcript(prompt + chosen)` gives back the original string.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

from ..errors import DataError
from .records import Messages, PreferencePair, SFTExample
from .rows import Row, require_mapping, type_name
from .turns import history_turns, sharegpt_messages, user_turn

# What each format reads, for detection messages and `--data-format` help.
FORMAT_KEYS = {
    "text": "prompt, chosen, rejected (strings), optional system",
    "implicit": "chosen, rejected (whole texts sharing a prompt)",
    "chat": "chosen, rejected (message lists), optional prompt (message list), optional tools",
    "hh": "chosen, rejected (\\n\\nHuman: / \\n\\nAssistant: transcripts)",
    "ultrafeedback": "prompt (string), chosen, rejected (message lists), score_chosen, score_rejected",
    "orca": "system, question or input, chosen, rejected (strings)",
    "alpaca": "instruction, optional input, chosen, rejected (strings), optional system, history ([user, assistant] "
              "pairs)",
    "sharegpt": "conversations [{from, value}], chosen, rejected ({from, value} or strings), optional system, tools",
    "openai": "messages [{role, content}], chosen, rejected ({role, content} or lists of them), optional tools",
    "medicalgpt": "question, response_chosen, response_rejected, optional system, history ([user, assistant] pairs)",
    "stack_exchange": "question, response_j (preferred), response_k",
    "shp": "history, human_ref_A, human_ref_B, labels (1 = A preferred)",
}
FORMAT_NAMES = tuple(FORMAT_KEYS)
SFT_KEYS = "messages (message list), prompt + completion (strings or message lists), conversations, or text"
# Keys that hold (part of) a prompt in some layout: a pair with an empty prompt beside one of them lost it.
PROMPT_KEYS = ("prompt", "instruction", "input", "question", "query", "conversations", "messages", "history",
               "context")


def new_row(value: Any, where: str, fmt: str) -> Row:
    return Row(value, where, fmt, SFT_KEYS if fmt == "sft" else FORMAT_KEYS.get(fmt, ""))


# --------------------------------------------------------------------------- detection
def _strings(value: dict, *keys: str) -> bool:
    return all(isinstance(value.get(k), str) for k in keys)


def _hh_texts(value: dict) -> bool:
    texts = [t for t in (value["chosen"], value["rejected"]) if isinstance(t, str)]
    return bool(texts) and all("\n\nHuman:" in t and "\n\nAssistant:" in t for t in texts)


# (format, why, test of the record's keys and value types), first match wins. `why` is said when the record
# also fits a later rule, so a choice between two readings is never silent.
_RULES: list[tuple[str, str, Callable[[dict, set], bool]]] = [
    ("sharegpt", "it has 'conversations'", lambda v, k: "conversations" in k),
    ("openai", "it has 'messages'", lambda v, k: "messages" in k),
    ("medicalgpt", "it has response_chosen/response_rejected", lambda v, k: {"response_chosen",
                                                                             "response_rejected"} <= k),
    ("stack_exchange", "it has response_j/response_k", lambda v, k: {"response_j", "response_k"} <= k),
    ("shp", "it has human_ref_A/human_ref_B", lambda v, k: {"human_ref_A", "human_ref_B"} <= k),
    ("alpaca", "it has 'instruction'", lambda v, k: "instruction" in k),
    ("orca", "it has 'question', or 'input' without 'prompt'",
     lambda v, k: "question" in k or ("input" in k and not {"prompt", "instruction"} & k)),
    ("ultrafeedback", "its prompt is a string and its answers message lists",
     lambda v, k: isinstance(v.get("prompt"), str) and isinstance(v["chosen"], list)),
    ("chat", "its answers are message lists", lambda v, k: isinstance(v["chosen"], list)),
    ("text", "it has a string 'prompt'", lambda v, k: "prompt" in k),
    ("hh", "its answers are Human/Assistant transcripts", lambda v, k: _strings(v, "chosen") and _hh_texts(v)),
    ("implicit", "its answers are strings", lambda v, k: _strings(v, "chosen")),
]
_PAIRED_ELSEWHERE = ("medicalgpt", "stack_exchange", "shp")  # their answers are not called chosen/rejected


def detect(value: Any) -> tuple[str | None, str | None]:
    """(format, note): the format a record looks like from its keys (and, where keys are shared, its value
    types), or None; the note says why when another layout's keys are present too, else None."""
    if not isinstance(value, dict):
        return None, None
    keys = set(value)
    paired = {"chosen", "rejected"} <= keys
    fits = [(fmt, why) for fmt, why, test in _RULES
            if (paired or fmt in _PAIRED_ELSEWHERE) and test(value, keys)]
    if not fits:
        return None, None
    fmt, why = fits[0]
    # Later rules that test value types (chat, text, hh, implicit) fit almost anything; only key-based rivals
    # are a real second reading.
    rivals = [f"{other} ({reason})" for other, reason in fits[1:]
              if other not in ("ultrafeedback", "chat", "text", "hh", "implicit")]
    note = (f"read as {fmt!r} because {why}; the keys fit {', '.join(rivals)} too (pass --data-format to choose)"
            if rivals else None)
    return fmt, note


def detect_format(value: Any) -> str | None:
    """The format a record looks like, from its keys (and, where keys are shared, its value types); else None."""
    return detect(value)[0]


def unknown_format_message(value: Any, where: str) -> str:
    seen = ", ".join(map(str, value)) if isinstance(value, dict) else type_name(value)
    known = "; ".join(f"{name} ({keys})" for name, keys in FORMAT_KEYS.items())
    return (f"{where}: cannot tell the data format from the keys seen ({seen}). Known formats: {known}. "
            "Rename the keys, or pass --data-format to force one")


# --------------------------------------------------------------------------- shared pieces
def split_system(messages: Messages) -> tuple[str | None, Messages]:
    """A leading system turn goes to `system`: the pair keeps it apart from the prompt."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def shared_turns(a: Messages, b: Messages) -> int:
    """How many leading turns two conversations share as their prompt.

    At least one turn is left to each answer, and the prompt ends on a user turn, so both answers start with
    the assistant speaking (the prompt is rendered with the generation prompt)."""
    n, limit = 0, min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    while n > 0 and a[n - 1]["role"] != "user":
        n -= 1
    return n


def _conversations(row: Row, chosen: Messages, rejected: Messages) -> PreferencePair:
    """Implicit-prompt chat: two whole conversations; the prompt is the run of turns they share."""
    system, chosen = split_system(chosen)
    other_system, rejected = split_system(rejected)
    if system != other_system:
        raise row.error("chosen and rejected start with different system turns")
    n = shared_turns(chosen, rejected)
    return PreferencePair(chosen[:n], chosen[n:], rejected[n:], system, row.where)


def _strip_prefix(answer: Messages, prompt: Messages) -> Messages:
    return answer[len(prompt):] if prompt and answer[:len(prompt)] == prompt else answer


# Turn boundaries for an implicit text prompt, most specific first; the prompt keeps the marker.
_TEXT_BOUNDARIES = ("\n\nAssistant:", "Assistant:", "### Response:", "\n")


def _shared_text_prompt(chosen: str, rejected: str) -> str:
    common = os.path.commonprefix([chosen, rejected])
    for marker in _TEXT_BOUNDARIES:
        cut = common.rfind(marker)
        if cut >= 0:
            return common[:cut + len(marker)]
    return ""  # no recognisable boundary: the texts are trained on whole


# --------------------------------------------------------------------------- HH-RLHF transcripts
_HH_MARKER = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_HH_SPEAKER = {"user": "Human", "assistant": "Assistant"}


def parse_hh(text: str) -> tuple[str, Messages]:
    """Split a transcript into (text before the first turn, turns). Contents are kept exactly."""
    if text.startswith(("Human: ", "Assistant: ")):
        text = "\n\n" + text  # some copies drop the leading blank line; write-back restores the canonical form
    parts = _HH_MARKER.split(text)
    turns = [{"role": _HH_ROLE[speaker], "content": content} for speaker, content in zip(parts[1::2], parts[2::2])]
    return parts[0], turns


def hh_transcript(messages: Messages, system: str | None = None) -> str:
    """The inverse of `parse_hh`: turns written back as an HH-RLHF transcript."""
    return (system or "") + "".join(f"\n\n{_HH_SPEAKER[m['role']]}: {m['content']}" for m in messages)


# --------------------------------------------------------------------------- one function a format
Converted = tuple[PreferencePair, "float | None"]


def _text(row: Row) -> Converted:
    pair = PreferencePair(row.text("prompt"), row.text("chosen"), row.text("rejected"),
                          row.optional_text("system"), row.where)
    return pair, None


def _implicit(row: Row) -> Converted:
    chosen, rejected = row.text("chosen"), row.text("rejected")
    prompt = _shared_text_prompt(chosen, rejected)
    return PreferencePair(prompt, chosen[len(prompt):], rejected[len(prompt):], None, row.where), None


def _chat(row: Row) -> Converted:
    return _message_pair(row, row.messages("chosen"), row.messages("rejected"),
                         row.messages("prompt") if row.has("prompt") else None), None


def _message_pair(row: Row, chosen: Messages, rejected: Messages, full_prompt: Messages | None) -> PreferencePair:
    """A pair of message lists, with the prompt given or (None) the run of turns the answers share."""
    if full_prompt is None:
        pair = _conversations(row, chosen, rejected)
    else:
        system, prompt = split_system(full_prompt)
        # Answers may repeat the prompt (whole conversations) or hold only the assistant turns.
        chosen = _strip_prefix(_strip_prefix(chosen, full_prompt), prompt)
        rejected = _strip_prefix(_strip_prefix(rejected, full_prompt), prompt)
        pair = PreferencePair(prompt, chosen, rejected, system, row.where)
    pair.tools = row.tools()
    return pair


def _hh(row: Row) -> Converted:
    for name in ("chosen", "rejected"):
        if row.text(name).endswith("\n\nAssistant:"):  # the marker's space is missing when the reply is empty
            raise row.error(f"{name} answer is empty (the transcript ends with an 'Assistant:' that says nothing)")
    preamble, chosen = parse_hh(row.text("chosen"))
    other, rejected = parse_hh(row.text("rejected"))
    if preamble != other:
        raise row.error("chosen and rejected have different text before their first turn")
    n = shared_turns(chosen, rejected)
    return PreferencePair(chosen[:n], chosen[n:], rejected[n:], preamble or None, row.where), None


def _ultrafeedback(row: Row) -> Converted:
    chosen, rejected = row.messages("chosen"), row.messages("rejected")
    if chosen and chosen[0]["role"] == "assistant":  # answers alone: the prompt string is the user turn
        prompt = [{"role": "user", "content": row.text("prompt")}]
        pair = PreferencePair(prompt, chosen, rejected, None, row.where)
    else:
        pair = _conversations(row, chosen, rejected)
    gap = None
    if row.has("score_chosen") or row.has("score_rejected"):
        gap = row.number("score_chosen") - row.number("score_rejected")
    return pair, gap


def _answer(row: Row, key: str) -> Messages:
    return [{"role": "assistant", "content": row.text(key)}]


def _turn_fields(row: Row, prompt: Messages, chosen: str, rejected: str) -> Converted:
    """A record whose text fields are turns: system, earlier turns, the user turn, the two answers."""
    pair = PreferencePair(prompt, _answer(row, chosen), _answer(row, rejected), row.optional_text("system"),
                          row.where, text_fields=True)
    return pair, None


def _orca(row: Row) -> Converted:
    prompt = row.text("question") if row.has("question") else row.text("input")
    return _turn_fields(row, [{"role": "user", "content": prompt}], "chosen", "rejected")


def _alpaca(row: Row) -> Converted:
    return _turn_fields(row, history_turns(row) + [user_turn(row, "instruction", "input")], "chosen", "rejected")


def _medicalgpt(row: Row) -> Converted:
    prompt = history_turns(row) + [{"role": "user", "content": row.text("question")}]
    return _turn_fields(row, prompt, "response_chosen", "response_rejected")


def _sharegpt(row: Row) -> Converted:
    system, prompt = split_system(sharegpt_messages(row, "conversations"))
    if row.has("system"):  # LLaMA-Factory's system column
        if system is not None:
            raise row.error("the system prompt is given twice: in the 'system' key and as a system turn")
        system = row.optional_text("system")
    chosen, rejected = sharegpt_messages(row, "chosen"), sharegpt_messages(row, "rejected")
    return PreferencePair(prompt, chosen, rejected, system, row.where, row.tools()), None


def _openai(row: Row) -> Converted:
    prompt = row.messages("messages")
    return _message_pair(row, row.messages("chosen"), row.messages("rejected"), prompt), None


def _stack_exchange(row: Row) -> Converted:
    pair = PreferencePair(row.text("question"), row.text("response_j"), row.text("response_k"), None, row.where)
    return pair, None


def _shp(row: Row) -> Converted:
    a, b = row.text("human_ref_A"), row.text("human_ref_B")
    label = row.get("labels")
    if isinstance(label, str) and label.strip() in ("0", "1"):  # CSV cells are strings
        label = int(label)
    if isinstance(label, bool) or label not in (0, 1):
        raise row.error(f"'labels' must be 1 (A preferred) or 0 (B preferred), got {label!r:.40}")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    gap = None
    if row.has("score_A") and row.has("score_B"):
        gap = abs(row.number("score_A") - row.number("score_B"))
    return PreferencePair(row.text("history"), chosen, rejected, None, row.where), gap


CONVERTERS: dict[str, Callable[[Row], Converted]] = {
    "text": _text, "implicit": _implicit, "chat": _chat, "hh": _hh, "ultrafeedback": _ultrafeedback,
    "orca": _orca, "alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai, "medicalgpt": _medicalgpt,
    "stack_exchange": _stack_exchange, "shp": _shp,
}
# Formats whose records may carry a chosen/rejected score (for --min-score-gap).
SCORED_FORMATS = ("ultrafeedback", "shp")


def to_pair(value: Any, fmt: str, where: str) -> Converted:
    """Normalise one raw record of format `fmt`; raises `DataError` naming the record if it is malformed."""
    pair, gap, _ = read_pair(value, fmt, where)
    return pair, gap


def read_pair(value: Any, fmt: str, where: str) -> tuple[PreferencePair, float | None, list[str]]:
    """`to_pair`, plus the keys of the record the format did not use."""
    row = new_row(value, where, fmt)
    pair, gap = CONVERTERS[fmt](row)
    for name in ("chosen", "rejected"):
        answer = getattr(pair, name)
        # A chat answer of empty content is kept (HH has real ones: an empty reply preferred, trained as the
        # end-of-turn token alone); `data check` reports them. No answer at all cannot be trained on.
        if (answer.strip() == "") if isinstance(answer, str) else not answer:
            raise row.error(f"{name} answer is empty")
        if isinstance(answer, list) and answer[-1]["role"] != "assistant":
            raise row.error(f"{name} answer must end with an assistant turn, got {answer[-1]['role']!r}")
    _require_prompt(row, pair.prompt)
    return pair, gap, row.unused()


def _require_prompt(row: Row, prompt: Any) -> None:
    """An empty prompt beside a key that holds prompts elsewhere means the prompt was lost: refuse the pair."""
    if isinstance(prompt, list):
        empty = all(not turn["content"].strip() and not turn.get("tool_calls") for turn in prompt)
    else:
        empty = not prompt.strip()
    if not empty:
        return
    keys = [key for key in PROMPT_KEYS if key in row.value]
    if keys:
        raise row.error(f"the prompt is empty, though the record has {', '.join(map(repr, keys))}; fill the "
                        "prompt, or pass --data-format to read the record another way")


# --------------------------------------------------------------------------- SFT


def to_sft(value: Any, where: str) -> SFTExample:
    """Normalise one SFT record: `messages`, `prompt`/`completion`, `conversations` (ShareGPT) or `text`."""
    return read_sft(value, where)[0]


def read_sft(value: Any, where: str) -> tuple[SFTExample, list[str]]:
    """`to_sft`, plus the keys of the record that were not used.

    A conversation's completion is every turn from the first assistant turn on (the loss covers each assistant
    turn in it; see tokenize.py), its prompt the turns before."""
    row = new_row(value, where, "sft")
    if row.has("label") and row.get("label") in (False, 0, "false", "False"):
        # Unpaired feedback marks this completion undesirable; SFT would teach it like any other.
        raise row.error("the completion is marked undesirable (label: false), and SFT trains on every completion "
                        "it reads; keep only the desirable ones for SFT")
    if row.has("messages") or row.has("conversations"):
        if row.has("messages"):
            system, turns = split_system(row.messages("messages"))
        else:
            system, turns = split_system(sharegpt_messages(row, "conversations"))
            if row.has("system"):
                system = system or row.optional_text("system")
        example = _sft_from_messages(row, turns, system)
    elif row.has("completion"):
        if isinstance(row.get("completion"), list):
            system, prompt = split_system(row.messages("prompt") if row.has("prompt") else [])
            example = SFTExample(row.messages("completion"), prompt or None, system, where)
        else:
            example = SFTExample(row.text("completion"), row.optional_text("prompt"), None, where)
    elif row.has("text"):
        example = SFTExample(row.text("text"), None, None, where)
    else:
        seen = ", ".join(map(str, row.value)) or "none"
        raise DataError(f"{where}: cannot read an SFT example from the keys seen ({seen}); expected {SFT_KEYS}")
    if isinstance(example.completion, list):
        example.tools = row.tools()
    return example, row.unused()


def _sft_from_messages(row: Row, turns: Messages, system: str | None) -> SFTExample:
    if not turns or turns[-1]["role"] != "assistant":
        raise row.error("the conversation must end with an assistant turn, the one trained on")
    first = next(i for i, turn in enumerate(turns) if turn["role"] == "assistant")
    return SFTExample(turns[first:], turns[:first], system, row.where)
