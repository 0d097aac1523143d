"""Unpaired feedback: each record rates one answer as desirable or not (the data of KTO), not a pair.

Two layouts: TRL's unpaired preference (`prompt`, `completion`, `label`: strings or message lists, label a
boolean) and LLaMA-Factory's KTO data (`kto_tag` beside an alpaca record's `instruction`/`input`/`output`, or a
ShareGPT `conversations` whose last turn is the rated answer). Both normalise into `UnpairedExample`.
"""

from __future__ import annotations

from typing import Any

from .records import UnpairedExample
from .rows import Row, require_trained, type_name
from .turns import QUESTIONS, history_turns, question_turn, sharegpt_messages, system_field

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
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):  # 1/0, and 1.0/0.0
        value = bool(value)  # as pandas writes a label column that has gaps
    if not isinstance(value, bool):
        raise row.error(f"{key!r} must be true (desirable) or false (undesirable), got {type_name(value)}")
    return value


def read_unpaired(value: Any, fmt: str, where: str) -> tuple[UnpairedExample, list[str]]:
    """One unpaired record as (example, keys not used); raises `DataError` naming the record if malformed."""
    row = Row(value, where, fmt, UNPAIRED_KEYS[fmt])
    if fmt == "unpaired":
        if isinstance(row.get("completion"), list):
            prompt = row.messages("prompt") if row.has("prompt") else []
            completion = row.messages("completion")
            if not prompt and completion and completion[0]["role"] in ("user", "system"):
                # the whole conversation (axolotl's argilla_chat form): the last turn is the rated answer
                if completion[-1]["role"] != "assistant":
                    raise row.error("the completion is a whole conversation, and it must end with the assistant "
                                    "turn being rated")
                prompt, completion = completion[:-1], completion[-1:]
            elif any(turn["role"] in ("user", "system", "tool") for turn in completion):
                raise row.error("the completion holds a user, system or tool turn after the prompt, and KTO rates "
                                "one answer as a whole (it would score those words too); end the prompt before the "
                                "rated assistant turn")
            system = None
            if prompt and prompt[0]["role"] == "system":
                system, prompt = prompt[0]["content"], prompt[1:]
            example = UnpairedExample(prompt, completion, _label(row, "label"), row.system_beside(system), where,
                                      row.tools())
        elif not row.holds("prompt") and (question := next((k for k in QUESTIONS if row.filled(k)), None)):
            # the question as a text field beside the completion (axolotl's argilla and intel KTO forms)
            answer = [{"role": "assistant", "content": row.text("completion")}]
            example = UnpairedExample([question_turn(row, question)], answer, _label(row, "label"),
                                      system_field(row), where, text_fields=True)
        else:
            prompt = row.optional_text("prompt") or ""  # a system prompt goes before it, as in a text pair
            example = UnpairedExample(prompt, row.text("completion"), _label(row, "label"),
                                      row.optional_text("system") if prompt else None, where)
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
        prompt = history_turns(row) + [question_turn(row, "instruction")]
        answer = [{"role": "assistant", "content": row.text("output")}]
        example = UnpairedExample(prompt, answer, _label(row, "kto_tag"), system_field(row), where)
    if isinstance(example.completion, list):
        example.template_kwargs = row.template_kwargs()
    if not example.prompt and row.holds("chosen"):  # axolotl's argilla_chat KTO form keeps the prompt there
        raise row.error("the prompt is empty, though the record has 'chosen' (a prompt kept under that name?); "
                        "give it as 'prompt'")
    row.require_prompt(example.prompt, read_from=("conversations", "messages", "completion"))
    row.require_open_prompt(example.prompt, example.completion)
    require_trained(example.completion, where)
    return example, row.unused()
