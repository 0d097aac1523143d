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

ROLES = ("user", "assistant", "system")
# What each format reads, for detection messages and `--data-format` help.
FORMAT_KEYS = {
    "text": "prompt, chosen, rejected (strings), optional system",
    "implicit": "chosen, rejected (whole texts sharing a prompt)",
    "chat": "chosen, rejected (message lists), optional prompt (message list)",
    "hh": "chosen, rejected (\\n\\nHuman: / \\n\\nAssistant: transcripts)",
    "ultrafeedback": "prompt (string), chosen, rejected (message lists), score_chosen, score_rejected",
    "orca": "system, question or input, chosen, rejected (strings)",
    "sharegpt": "conversations [{from, value}], chosen, rejected ({from, value})",
    "stack_exchange": "question, response_j (preferred), response_k",
    "shp": "history, human_ref_A, human_ref_B, labels (1 = A preferred)",
}
FORMAT_NAMES = tuple(FORMAT_KEYS)
SFT_KEYS = "messages (message list), prompt + completion (strings or message lists), conversations, or text"


class Row:
    """A raw record and where it came from. Getters check presence and type, and raise `DataError` otherwise."""

    def __init__(self, value: Any, where: str, fmt: str):
        self.value, self.where, self.fmt = require_mapping(value, where), where, fmt

    def error(self, problem: str) -> DataError:
        expects = SFT_KEYS if self.fmt == "sft" else FORMAT_KEYS.get(self.fmt, "")
        return DataError(f"{self.where}: {problem} (format {self.fmt!r}: {expects})")

    def has(self, key: str) -> bool:
        return self.value.get(key) is not None

    def get(self, key: str) -> Any:
        if key not in self.value or self.value[key] is None:
            seen = ", ".join(map(str, self.value)) or "none"
            raise self.error(f"missing key {key!r} (keys seen: {seen})")
        return self.value[key]

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise self.error(f"{key!r} must be a string, got {_type_name(value)}")
        return value

    def optional_text(self, key: str) -> str | None:
        """A text field that may be absent or empty; empty counts as absent."""
        return self.text(key) or None if self.has(key) else None

    def number(self, key: str) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"{key!r} must be a number, got {_type_name(value)}")
        return float(value)

    def messages(self, key: str, value: Any = None) -> Messages:
        value = self.get(key) if value is None else value
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise self.error(f"{key!r} must be a list of {{role, content}} messages, got {_type_name(value)}")
        return [self._message(key, i, m) for i, m in enumerate(value)]

    def _message(self, key: str, index: int, message: Any) -> dict[str, str]:
        at = f"{key!r} message {index + 1}"
        if not isinstance(message, dict):
            raise self.error(f"{at} must be a {{role, content}} object, got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise self.error(f"{at} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise self.error(f"{at} content must be a string, got {_type_name(content)}")
        return {"role": role, "content": content}


def require_mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object (a mapping of keys to values), got {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


# --------------------------------------------------------------------------- detection
def detect_format(value: Any) -> str | None:
    """The format a record looks like, from its keys (and, where keys are shared, its value types); else None."""
    if not isinstance(value, dict):
        return None
    keys = set(value)
    if "conversations" in keys and {"chosen", "rejected"} <= keys:
        return "sharegpt"
    if {"response_j", "response_k"} <= keys:
        return "stack_exchange"
    if {"human_ref_A", "human_ref_B"} <= keys:
        return "shp"
    if not {"chosen", "rejected"} <= keys:
        return None
    chosen, rejected = value["chosen"], value["rejected"]
    if "question" in keys or ("input" in keys and "prompt" not in keys):
        return "orca"
    if "prompt" in keys:
        if isinstance(chosen, list):
            return "ultrafeedback" if isinstance(value["prompt"], str) else "chat"
        return "text"
    if isinstance(chosen, list):
        return "chat"
    if isinstance(chosen, str):
        texts = [t for t in (chosen, rejected) if isinstance(t, str)]
        hh = all("\n\nHuman:" in t and "\n\nAssistant:" in t for t in texts)
        return "hh" if hh else "implicit"
    return None


def unknown_format_message(value: Any, where: str) -> str:
    seen = ", ".join(map(str, value)) if isinstance(value, dict) else _type_name(value)
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
    chosen, rejected = row.messages("chosen"), row.messages("rejected")
    if not row.has("prompt"):
        return _conversations(row, chosen, rejected), None
    full_prompt = row.messages("prompt")
    system, prompt = split_system(full_prompt)
    # Answers may repeat the prompt (whole conversations) or hold only the assistant turns.
    chosen = _strip_prefix(_strip_prefix(chosen, full_prompt), prompt)
    rejected = _strip_prefix(_strip_prefix(rejected, full_prompt), prompt)
    return PreferencePair(prompt, chosen, rejected, system, row.where), None


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


def _orca(row: Row) -> Converted:
    prompt = row.text("question") if row.has("question") else row.text("input")
    pair = PreferencePair(prompt, row.text("chosen"), row.text("rejected"), row.optional_text("system"), row.where)
    return pair, None


_SHAREGPT_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "chatgpt": "assistant", "system": "system"}


def sharegpt_messages(row: Row, key: str, value: Any = None) -> Messages:
    """ShareGPT turns (`{"from", "value"}`) as `{"role", "content"}` messages."""
    value = row.get(key) if value is None else value
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list):
        raise row.error(f"{key!r} must be a list of {{from, value}} turns, got {_type_name(value)}")
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in _SHAREGPT_ROLE:
            raise row.error(f"{key!r} turn {i + 1} must be an object whose 'from' is one of "
                            f"{', '.join(_SHAREGPT_ROLE)}; got {turn!r:.80}")
        messages.append({"role": _SHAREGPT_ROLE[speaker], "content": turn.get("value")})
    return row.messages(key, messages)  # checks the contents are strings


def _sharegpt(row: Row) -> Converted:
    system, prompt = split_system(sharegpt_messages(row, "conversations"))
    chosen, rejected = sharegpt_messages(row, "chosen"), sharegpt_messages(row, "rejected")
    return PreferencePair(prompt, chosen, rejected, system, row.where), None


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
    "orca": _orca, "sharegpt": _sharegpt, "stack_exchange": _stack_exchange, "shp": _shp,
}
# Formats whose records may carry a chosen/rejected score (for --min-score-gap).
SCORED_FORMATS = ("ultrafeedback", "shp")


def to_pair(value: Any, fmt: str, where: str) -> Converted:
    """Normalise one raw record of format `fmt`; raises `DataError` naming the record if it is malformed."""
    row = Row(value, where, fmt)
    pair, gap = CONVERTERS[fmt](row)
    for name in ("chosen", "rejected"):
        answer = getattr(pair, name)
        # A chat answer of empty content is kept (HH has real ones: an empty reply preferred, trained as the
        # end-of-turn token alone); `data check` reports them. No answer at all cannot be trained on.
        if (answer.strip() == "") if isinstance(answer, str) else not answer:
            raise row.error(f"{name} answer is empty")
        if isinstance(answer, list) and answer[-1]["role"] != "assistant":
            raise row.error(f"{name} answer must end with an assistant turn, got {answer[-1]['role']!r}")
    return pair, gap


# --------------------------------------------------------------------------- SFT


def to_sft(value: Any, where: str) -> SFTExample:
    """Normalise one SFT record: `messages`, `prompt`/`completion`, `conversations` (ShareGPT) or `text`."""
    row = Row(value, where, "sft")
    if row.has("label") and row.get("label") in (False, 0, "false", "False"):
        # Unpaired feedback marks this completion undesirable; SFT would teach it like any other.
        raise row.error("the completion is marked undesirable (label: false), and SFT trains on every completion "
                        "it reads; keep only the desirable ones for SFT")
    if row.has("messages") or row.has("conversations"):
        messages = (row.messages("messages") if row.has("messages")
                    else sharegpt_messages(row, "conversations"))
        return _sft_from_messages(row, messages)
    if row.has("completion"):
        if isinstance(row.get("completion"), list):
            system, prompt = split_system(row.messages("prompt") if row.has("prompt") else [])
            return SFTExample(row.messages("completion"), prompt or None, system, where)
        return SFTExample(row.text("completion"), row.optional_text("prompt"), None, where)
    if row.has("text"):
        return SFTExample(row.text("text"), None, None, where)
    seen = ", ".join(map(str, row.value)) or "none"
    raise DataError(f"{where}: cannot read an SFT example from the keys seen ({seen}); expected {SFT_KEYS}")


def _sft_from_messages(row: Row, messages: Messages) -> SFTExample:
    system, turns = split_system(messages)
    if not turns or turns[-1]["role"] != "assistant":
        raise row.error("the conversation must end with an assistant turn, the one trained on")
    return SFTExample(turns[-1:], turns[:-1], system, row.where)
