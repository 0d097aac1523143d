"""Unpaired feedback: each record rates one answer as desirable or not (the data of KTO), not a pair.

Two layouts: TRL's unpaired preference (`prompt`, `completion`, `label`: strings or message lists, label a
boolean) and LLaMA-Factory's KTO data (`kto_tag` beside an alpaca record's `instruction`/`input`/`output`, or a
ShareGPT `conversations` whose last turn is the rated answer). Both normalise into `UnpairedExample`.
"""

from __future__ import annotations

from typing import Any

from .records import UnpairedExample
from .rows import Row, type_name
from .turns import history_turns, sharegpt_messages, user_turn

UNPAIRED_KEYS = {
    "unpaired": "prompt, completion, label (true = desirable)",
    "kto_tag": "kto_tag (true = desirable) with instruction/input/output, or with conversations; or label with "
               "conversations or messages (LLaMA-Factory's KTO demo)",
}
UNPAIRED_FORMATS = tuple(UNPAIRED_KEYS)


def detect_unpaired(value: Any) -> str | None:
    if not isinstance(value, dict) or {"chosen", "rejected"} <= set(value):
        return None
    keys = set(value)
    if "kto_tag" in keys:
        return "kto_tag"
    if {"completion", "label"} <= keys:
        return "unpaired"
    if "label" in keys and {"messages", "conversations"} & keys:  # LLaMA-Factory's tag, renamed by its dataset_info
        return "kto_tag"
    return None


def _label(row: Row, key: str) -> bool:
    value = row.get(key)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):  # CSV cells are strings
        value = value.strip().lower() in ("true", "1")
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):  # 1/0 as many files write it
        value = bool(value)
    if not isinstance(value, bool):
        raise row.error(f"{key!r} must be true (desirable) or false (undesirable), got {type_name(value)}")
    return value


def read_unpaired(value: Any, fmt: str, where: str) -> tuple[UnpairedExample, list[str]]:
    """One unpaired record as (example, keys not used); raises `DataError` naming the record if malformed."""
    row = Row(value, where, fmt, UNPAIRED_KEYS[fmt])
    if fmt == "unpaired":
        if isinstance(row.get("completion"), list):
            prompt = row.messages("prompt") if row.has("prompt") else []
            system = None
            if prompt and prompt[0]["role"] == "system":
                system, prompt = prompt[0]["content"], prompt[1:]
            example = UnpairedExample(prompt, row.messages("completion"), _label(row, "label"),
                                      row.system_beside(system), where, row.tools())
        else:
            example = UnpairedExample(row.optional_text("prompt") or "", row.text("completion"),
                                      _label(row, "label"), None, where)
    elif row.has("conversations") or row.has("messages"):
        tag = "kto_tag" if row.has("kto_tag") else "label"
        turns = sharegpt_messages(row, "conversations") if row.has("conversations") else row.messages("messages")
        if not turns or turns[-1]["role"] != "assistant":
            raise row.error("the conversation must end with the assistant turn being rated")
        system = None
        if turns[0]["role"] == "system":
            system, turns = turns[0]["content"], turns[1:]
        example = UnpairedExample(turns[:-1], turns[-1:], _label(row, tag), row.system_beside(system), where,
                                  row.tools())
    else:
        prompt = history_turns(row) + [user_turn(row, "instruction", "input")]
        answer = [{"role": "assistant", "content": row.text("output")}]
        example = UnpairedExample(prompt, answer, _label(row, "kto_tag"), row.optional_text("system"), where)
    if isinstance(example.completion, list):
        example.template_kwargs = row.template_kwargs()
    row.require_prompt(example.prompt, read_from=("conversations", "messages"))
    row.require_open_prompt(example.prompt, example.completion)
    return example, row.unused()
