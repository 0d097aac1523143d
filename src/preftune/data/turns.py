"""Turn lists written in other people's layouts, read into `{"role", "content"}` messages.

- ShareGPT (`{"from", "value"}`): human/gpt/system turns, and LLaMA-Factory's tool turns: `function_call` (an
  assistant tool call, its value `{"name", "arguments"}` as JSON, or a list of them for parallel calls) and
  `observation` (the tool's result).
- Alpaca (LLaMA-Factory): `instruction` and `input` joined as `instruction + "\\n" + input` make the user turn
  (input left out when empty); `history` is a list of `[user, assistant]` pairs before it. Other projects' names
  for the same fields (`QUESTIONS`, `EXTRA_INPUTS`, `SYSTEM_FIELDS`) are read by the same rule.
"""

from __future__ import annotations

import json
from typing import Any

from .rows import TURN_WEIGHTS, Messages, Row, type_name

SHAREGPT_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "bot": "assistant", "chatgpt": "assistant", "system": "system", "function_call": "assistant",
                 "observation": "tool", "tool": "tool", "function": "tool"}


def sharegpt_messages(row: Row, key: str, value: Any = None) -> Messages:
    """ShareGPT turns (`{"from", "value"}`) as messages; a bare string is one assistant turn."""
    value = row.get(key) if value is None else value
    if isinstance(value, str):  # MedicalGPT and others write the answers as plain strings
        return [{"role": "assistant", "content": value}]
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list):
        raise row.error(f"{key!r} must be a list of {{from, value}} turns, got {type_name(value)}")
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLE:
            raise row.error(f"{key!r} turn {i + 1} must be an object whose 'from' is one of "
                            f"{', '.join(SHAREGPT_ROLE)}; got {turn!r:.80}")
        for part in turn:
            if part not in ("from", "value", *TURN_WEIGHTS) and turn[part] is not None:
                row.unread_parts.add(f"{key}[].{part}")
        content = turn.get("value")
        weights = {k: turn[k] for k in TURN_WEIGHTS if k in turn}  # read with the message, in row.message
        if speaker == "function_call":
            messages.append({**_function_call(row, f"{key!r} turn {i + 1}", content), **weights})
            continue
        messages.append({"role": SHAREGPT_ROLE[speaker], "content": content, **weights})
    return row.messages(key, messages)  # checks the contents are strings


def _function_call(row: Row, at: str, value: Any) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise row.error(f"{at}: a function_call value must be JSON {{name, arguments}}, got {value!r:.60}") \
                from None
    return {"role": "assistant", "content": "", "tool_calls": row.tool_calls(at, value)}


# A question and its parts written as text fields, as projects name them: the question (Alpaca and Dolly:
# instruction; OpenOrca and GSM8K: question; ms-swift and MetaMath: query; else input), text joined after it
# (Alpaca's input, Dolly's context), and the system prompt (OpenOrca's system_prompt). First found wins.
QUESTIONS = ("instruction", "question", "query", "input", "problem")  # the last: MATH, OpenMathInstruct
EXTRA_INPUTS = ("input", "context")
SYSTEM_FIELDS = ("system", "system_prompt")


def user_turn(row: Row, instruction: str, extra: str | None) -> dict[str, str]:
    """LLaMA-Factory's alpaca rule: the user turn is `instruction + "\\n" + input`, input left out when empty."""
    text = row.text(instruction)
    if extra is not None and row.has(extra) and row.text(extra):
        text = f"{text}\n{row.text(extra)}" if text else row.text(extra)
    return {"role": "user", "content": text}


def question_turn(row: Row, question: str) -> dict[str, str]:
    """The user turn of a `question` field and the first filled one of `EXTRA_INPUTS` beside it (alpaca's
    rule)."""
    return user_turn(row, question, next((k for k in EXTRA_INPUTS if k != question and row.filled(k)), None))


def system_field(row: Row) -> str | None:
    """The system prompt of a record written as text fields: the first of `SYSTEM_FIELDS` it fills."""
    key = next((k for k in SYSTEM_FIELDS if row.filled(k)), None)
    return row.optional_text(key) if key else None


def history_turns(row: Row, key: str = "history") -> Messages:
    """`[[user, assistant], ...]` as alternating messages; absent or empty gives []."""
    if not row.has(key):
        return []
    value = row.get(key)
    if not isinstance(value, list):
        raise row.error(f"{key!r} must be a list of [user, assistant] pairs, got {type_name(value)}")
    turns = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise row.error(f"{key!r} entry {i + 1} must be a [user, assistant] pair of strings, got {pair!r:.80}")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns
