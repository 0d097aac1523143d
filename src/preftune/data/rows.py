"""Checked access to one raw record: every read is typed, and every key read is remembered.

A missing key or a wrong type becomes a one-line `DataError` naming the record, the key and the expected type,
never a KeyError or TypeError. `Row.unused()` lists the keys no reader looked at, so that nothing a record
holds is dropped without a word (`data check` counts them, training warns once).

Messages are `{"role", "content"}` with role user, assistant, system or tool; an assistant message may carry
`tool_calls` (`[{"type": "function", "function": {"name", "arguments"}}]`, the form chat templates read) and a
tool message may carry `tool_call_id` / `name`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import DataError

ROLES = ("user", "assistant", "system", "tool")
# Per-turn training switches of other tools' chat data, and the key a message keeps the answer "no" under.
TURN_WEIGHTS = ("weight", "loss", "loss_weight")
NOT_TRAINED = "preftune_not_trained"
# Keys that hold (part of) a prompt in some layout: an empty prompt beside one of them was lost.
PROMPT_KEYS = ("prompt", "instruction", "input", "question", "query", "conversations", "messages", "history",
               "context")
Messages = list[dict[str, Any]]


class Row:
    """A raw record and where it came from. `expects` says what the layout reads, for error messages."""

    def __init__(self, value: Any, where: str, fmt: str, expects: str = ""):
        self.value, self.where, self.fmt, self.expects = require_mapping(value, where), where, fmt, expects
        self.used: set[str] = set()
        self.unread_parts: set[str] = set()  # `key[].part`: a part of a message no reader takes

    def error(self, problem: str) -> DataError:
        return DataError(f"{self.where}: {problem} (format {self.fmt!r}: {self.expects})")

    def unused(self) -> list[str]:
        """Keys of the record (and `key[].part` of its message lists) that no reader looked at; an empty value
        (null, "", [] or {}: a blank CSV cell, an empty column) loses nothing and is not listed."""
        unread = [str(key) for key, value in self.value.items()
                  if key not in self.used and value is not None and not (isinstance(value, (str, list, dict))
                                                                          and not value)]
        return unread + sorted(self.unread_parts)

    def has(self, key: str) -> bool:
        self.used.add(key)
        return self.value.get(key) is not None

    def holds(self, key: str) -> bool:
        """`has` without counting the key as read: for choosing a layout, whose reader then reads it."""
        return self.value.get(key) is not None

    def filled(self, key: str) -> bool:
        """`holds` with something in it: for choosing between fields, where a blank one (an empty CSV cell beside
        the filled column) must not win."""
        return filled(self.value, key)

    def system_beside(self, system: str | None) -> str | None:
        """The system prompt of a conversation whose own leading system turn is `system`, with the record's
        'system' key (LLaMA-Factory's column) beside it: one of the two, or both when they are the same text;
        two different ones are refused, not one dropped."""
        column = self.optional_text("system")  # empty (a blank CSV cell) counts as absent
        if column is not None and system is not None and column != system:
            raise self.error("the system prompt is given twice: in the 'system' key and as a system turn; keep one")
        return system if column is None else column

    def require_open_prompt(self, prompt: Any, answer: Any) -> None:
        """A prompt of turns must leave the answer to come: one ending with an assistant turn would make each
        answer a second assistant turn after it, and often holds the answer itself (a `messages` list that is
        the whole chosen conversation)."""
        if not isinstance(prompt, list) or not prompt or prompt[-1]["role"] != "assistant":
            return
        if isinstance(answer, list) and answer and answer[0]["role"] == "tool":
            return  # the prompt ends with a tool call, the answer with its result
        if isinstance(answer, list) and answer and answer[0] == prompt[-1]:
            raise self.error("the prompt ends with the answer itself (its last turn is the chosen answer's first: "
                             "the prompt list seems to hold the whole conversation); give the prompt's turns only")
        raise self.error("the prompt ends with an assistant turn, so the answer would be a second assistant turn "
                         "after it; end the prompt with a user or tool turn")

    def require_prompt(self, prompt: Any, read_from: tuple[str, ...] = ()) -> None:
        """An empty prompt beside a key that holds prompts in some layout means the prompt was lost (read under
        another layout than the file's): refused. `read_from`: keys the prompt was read from that may be empty
        of a prompt (a conversation of the answer alone)."""
        if isinstance(prompt, list):
            empty = all(not turn["content"].strip() and not turn.get("tool_calls") for turn in prompt)
        else:
            empty = not prompt.strip()
        keys = [key for key in PROMPT_KEYS if key in self.value and key not in read_from] if empty else []
        if keys:
            raise self.error(f"the prompt is empty, though the record has {', '.join(map(repr, keys))}; fill the "
                             "prompt, or pass --data-format to read the record another way")

    def get(self, key: str) -> Any:
        self.used.add(key)
        if key in self.value and self.value[key] is None:
            raise self.error(f"{key!r} is null")
        if key not in self.value:
            seen = ", ".join(map(str, self.value)) or "none"
            raise self.error(f"missing key {key!r} (keys seen: {seen})")
        return self.value[key]

    def text(self, key: str, value: Any = None) -> str:
        value = self.get(key) if value is None else value
        if not isinstance(value, str):
            raise self.error(f"{key!r} must be a string, got {type_name(value)}")
        return self.encodable(repr(key), value)

    def encodable(self, at: str, text: str) -> str:
        """`text`, refused if it holds a lone UTF-16 surrogate (valid JSON, "\\ud83d", but not text: half of an
        emoji cut in two), which no tokenizer takes."""
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise self.error(f"{at} holds a lone UTF-16 surrogate ({text[exc.start:exc.end]!r} at character "
                                 f"{exc.start + 1}), half of a character cut in two; repair or drop the record"
                                 ) from None
        return text

    def optional_text(self, key: str) -> str | None:
        """A text field that may be absent or empty; empty counts as absent."""
        return self.text(key) or None if self.has(key) else None

    def number(self, key: str, *, finite: bool = True) -> float:
        """A number (a CSV cell's text too); NaN and infinities refused unless `finite` is False (scores, which
        only --min-score-gap reads, and which it refuses then)."""
        value = self.get(key)
        if isinstance(value, str):  # CSV cells are strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"{key!r} must be a number, got {type_name(value)}")
        if finite and not math.isfinite(value):  # NaN passes every comparison
            raise self.error(f"{key!r} must be a finite number, got {value}")
        return float(value)

    def messages(self, key: str, value: Any = None) -> Messages:
        value = self.get(key) if value is None else value
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise self.error(f"{key!r} must be a list of {{role, content}} messages, got {type_name(value)}")
        return [self.message(key, i, m) for i, m in enumerate(value)]

    def message(self, key: str, index: int, message: Any) -> dict[str, Any]:
        at = f"{key!r} message {index + 1}"
        if not isinstance(message, dict):
            raise self.error(f"{at} must be a {{role, content}} object, got {type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise self.error(f"{at} has role {role!r}; expected one of {', '.join(ROLES)}")
        calls = message.get("tool_calls") or None
        if content is None and calls is not None:
            content = ""  # OpenAI writes null content beside tool calls
        if isinstance(content, list):
            content = self.text_parts(at, content)
        if not isinstance(content, str):
            raise self.error(f"{at} content must be a string or a list of text parts, got {type_name(content)}")
        self.encodable(f"{at} content", content)
        out: dict[str, Any] = {"role": role, "content": content}
        if calls is not None:
            if role != "assistant":
                raise self.error(f"{at}: only an assistant message may hold tool_calls, not a {role} message")
            out["tool_calls"] = self.tool_calls(f"{at} tool_calls", calls)
        for extra in ("tool_call_id", "name"):
            if role == "tool" and message.get(extra) is not None:
                out[extra] = self.text(f"{at} {extra}", message[extra])
        if self._trains(at, message) is False:
            out[NOT_TRAINED] = True
        for part in message:
            if part not in out and part not in ("role", "content", "tool_calls", *TURN_WEIGHTS) \
                    and message[part] is not None:
                self.unread_parts.add(f"{key}[].{part}")
        return out

    def _trains(self, at: str, message: dict) -> bool | None:
        """A turn's own word on whether it is trained: OpenAI's and axolotl's `weight` (0 or 1), ms-swift's `loss`
        (true or false), LLaMA-Factory's `loss_weight` (0 or 1); None when it says nothing. Other weights are
        refused: a loss scaled per turn is not something preftune does."""
        said = None
        for key in TURN_WEIGHTS:
            value = message.get(key)
            if value is None:
                continue
            if value in (0, 1) or isinstance(value, bool):  # True == 1 and False == 0
                said = bool(value) if said is None else said and bool(value)
                continue
            raise self.error(f"{at} has {key} {value!r}; a turn is trained (1, true) or not (0, false), and "
                             f"other weights are not supported")
        if said is False and message.get("role") != "assistant":
            return None  # only assistant turns are ever trained
        return said

    def text_parts(self, at: str, parts: list) -> str:
        """Content given as parts (`[{"type": "text", "text": ...}]`: OpenAI, TRL; "value" in LLaMA-Factory v1),
        joined as chat templates that take parts render them, one after the other; anything but text is refused."""
        texts = []
        for i, part in enumerate(parts):
            kind = part.get("type", "text") if isinstance(part, dict) else type_name(part)
            text = part.get("text", part.get("value")) if isinstance(part, dict) else None
            if kind != "text" or not isinstance(text, str):
                raise self.error(f"{at} content part {i + 1} is {kind!r}, not a text part with a 'text' string; "
                                 "preftune trains on text only")
            texts.append(text)
        return "".join(texts)

    def tool_calls(self, at: str, calls: Any) -> list[dict]:
        """OpenAI tool calls (`{"type", "function": {"name", "arguments"}}`, arguments a JSON string or an object)
        or bare `{"name", "arguments"}` objects, as `{"type": "function", "function": {"name", "arguments"}}`
        with the arguments an object, the form chat templates render."""
        calls = [calls] if isinstance(calls, dict) else calls
        if not isinstance(calls, list) or not calls:
            raise self.error(f"{at} must be a list of {{name, arguments}} calls, got {type_name(calls)}")
        out = []
        for i, call in enumerate(calls):
            inner = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(inner, dict) or not isinstance(inner.get("name"), str):
                raise self.error(f"{at} call {i + 1} must be an object with a string 'name', got {call!r:.80}")
            args = inner.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    raise self.error(f"{at} call {i + 1}: 'arguments' is not valid JSON ({args!r:.60})") from None
            if not isinstance(args, dict):
                raise self.error(f"{at} call {i + 1}: 'arguments' must be an object, got {type_name(args)}")
            tidy = {"type": "function", "function": {"name": inner["name"], "arguments": args}}
            if isinstance(call.get("id"), str):
                tidy["id"] = call["id"]
            out.append(tidy)
        return out

    def tools(self, key: str = "tools") -> list[dict] | None:
        """Tool definitions: a list of JSON schemas, or that list as a JSON string (LLaMA-Factory's `tools`
        column). Bare `{"name", "description", "parameters"}` schemas are wrapped as `{"type": "function",
        "function": ...}`, the form chat templates read. Absent or empty gives None."""
        if not self.has(key):
            return None
        value = self.get(key)
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise self.error(f"{key!r} is a string but not valid JSON ({exc.msg} at column {exc.colno})") \
                    from None
        value = [value] if isinstance(value, dict) else value
        if not isinstance(value, list):
            raise self.error(f"{key!r} must be a list of tool schemas, got {type_name(value)}")
        out = []
        for i, tool in enumerate(value):
            inner = tool.get("function", tool) if isinstance(tool, dict) else None
            if not isinstance(inner, dict) or not isinstance(inner.get("name"), str):
                raise self.error(f"{key!r} tool {i + 1} must be a schema with a string 'name', got {tool!r:.80}")
            out.append(tool if "function" in tool else {"type": "function", "function": tool})
        return out or None

    def template_kwargs(self, key: str = "chat_template_kwargs") -> dict | None:
        """The record's own arguments to the chat template (TRL's `chat_template_kwargs`: Qwen3's
        `enable_thinking`), an object or that object as a JSON string (a CSV cell). A null value is left out (a
        dataset's struct column gives every record every key); absent or empty gives None. Arguments that would
        change what is rendered beyond the template's own switches (the generation prompt, tools) are refused."""
        if not self.has(key):
            return None
        value = self.get(key)
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise self.error(f"{key!r} is a string but not valid JSON ({exc.msg} at column {exc.colno})") \
                    from None
        if not isinstance(value, dict):
            raise self.error(f"{key!r} must be an object of chat template arguments, got {type_name(value)}")
        taken = sorted(set(value) & _TEMPLATE_OWN)
        if taken:
            raise self.error(f"{key!r} sets {', '.join(taken)}, which preftune sets itself when it renders a "
                             "record; give tools as the record's 'tools', and leave the others out")
        return {str(k): v for k, v in value.items() if v is not None} or None


# apply_chat_template's own arguments: a record's chat_template_kwargs may not set them.
_TEMPLATE_OWN = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                 "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                 "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


def turn_list(value: Any, *shapes: tuple[str, ...]) -> bool:
    """Whether `value` is a non-empty list of turns, each an object holding the keys of one of `shapes`
    (("role", "content") for messages, ("from", "value") for ShareGPT turns)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, dict) and any(set(shape) <= set(t) for shape in shapes) for t in value)


def filled(value: dict, key: str) -> bool:
    """Whether record `value` holds something under `key`: not null, and not blank text or an empty list."""
    held = value.get(key)
    return held is not None and not (isinstance(held, (str, list, dict)) and not (
        held.strip() if isinstance(held, str) else held))


def require_trained(answer: Any, where: str) -> None:
    """An answer turn its data marks not to train (weight 0): only SFT masks turns, so a preference or KTO answer
    holding one is refused rather than trained."""
    if isinstance(answer, list) and any(turn.get(NOT_TRAINED) for turn in answer):
        raise DataError(f"{where}: an answer turn is marked not to be trained (weight 0 or loss false), which only "
                        f"SFT reads (it masks the turn); drop the mark, or train the record with preftune sft")


def require_mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object (a mapping of keys to values), got {type_name(value)}")
    return value


def type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__)
