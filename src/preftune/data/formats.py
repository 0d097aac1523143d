"""Normalise a preference or SFT record of a known format into a `PreferencePair` or `SFTExample`.

Every preference format is a function `row -> (pair, score_gap)` (conversations.py for message-list layouts,
fields.py for string-field layouts; detect.py tells them apart); `score_gap` is chosen minus rejected score
where the format carries scores, else None. Field access goes through `Row`, so a missing key or a wrong type
becomes a one-line `DataError` naming the key, the record and the expected type, never a KeyError or TypeError.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import DataError
from .conversations import MESSAGE_LAYOUTS, Converted, split_system
from .detect import FORMAT_KEYS, FORMAT_NAMES, detect
from .fields import FIELD_LAYOUTS
from .records import Messages, PreferencePair, SFTExample
from .rows import NOT_TRAINED, Row, filled, require_trained, turn_list
from .turns import QUESTIONS, history_turns, question_turn, sharegpt_messages, system_field

SFT_KEYS = ("messages (message list), prompt + completion (or response; strings or message lists), "
            "conversations, a question and its answer as text fields (instruction, question, query or problem; "
            "output, response, answer, solution or generated_solution; optional input or context, system or "
            "system_prompt, history), or text")
# The answer of an SFT record written as text fields (the question's names are turns.QUESTIONS): Alpaca's
# output, Dolly's and OpenOrca's response, MATH's solution (before its final `answer`, as MATH-500 keeps both),
# OpenMathInstruct's generated_solution, GSM8K's answer, a completion beside a question.
SFT_ANSWERS = ("output", "response", "solution", "generated_solution", "answer", "completion")


def sft_fields(value: dict) -> tuple[str, str] | None:
    """(question key, answer key) of an SFT record written as text fields, or None: the first of each that holds
    something (a blank CSV cell beside the filled column does not count)."""
    def first(keys):  # a blank one only when none is filled: then it is refused as empty, naming it
        return next((k for k in keys if filled(value, k)), None) or next((k for k in keys if k in value and
                                                                           value[k] is not None), None)
    question, answer = first(QUESTIONS), first(SFT_ANSWERS)
    return (question, answer) if question and answer else None


def new_row(value: Any, where: str, fmt: str) -> Row:
    return Row(value, where, fmt, SFT_KEYS if fmt == "sft" else FORMAT_KEYS.get(fmt, ""))


_LAYOUTS = {**MESSAGE_LAYOUTS, **FIELD_LAYOUTS}
CONVERTERS: dict[str, Callable[[Row], Converted]] = {name: _LAYOUTS[name] for name in FORMAT_NAMES}
# Formats whose records may carry a chosen/rejected score (for --min-score-gap).
SCORED_FORMATS = ("ultrafeedback", "shp", "helpsteer3")


def to_pair(value: Any, fmt: str, where: str) -> Converted:
    """Normalise one raw record of format `fmt`; raises `DataError` naming the record if it is malformed."""
    pair, gap, _ = read_pair(value, fmt, where)
    return pair, gap


def read_pair(value: Any, fmt: str, where: str) -> tuple[PreferencePair, float | None, list[str]]:
    """`to_pair`, plus the keys of the record the format did not use."""
    row = new_row(value, where, fmt)
    pair, gap = CONVERTERS[fmt](row)
    if pair.is_chat:  # a template renders it (text fields too, unless kept as text): its own arguments to it
        pair.template_kwargs = row.template_kwargs()
    if row.has("margin") and row.get("margin") != "":  # any pair layout may carry a per-pair margin (TRL's
        # reward-model column); an empty CSV cell is a missing one
        pair.margin = row.number("margin")
    for name in ("chosen", "rejected"):
        answer = getattr(pair, name)
        # A chat answer of empty content is kept (HH has real ones: an empty reply preferred, trained as the
        # end-of-turn token alone); `data check` reports them. No answer at all cannot be trained on.
        if (answer.strip() == "") if isinstance(answer, str) else not answer:
            raise row.error(f"{name} answer is empty")
        if isinstance(answer, list) and answer[-1]["role"] != "assistant":
            raise row.error(f"{name} answer must end with an assistant turn, got {answer[-1]['role']!r}")
    row.require_prompt(pair.prompt)
    row.require_open_prompt(pair.prompt, pair.chosen)
    require_trained(pair.chosen, row.where)
    require_trained(pair.rejected, row.where)
    return pair, gap, row.unused()


# --------------------------------------------------------------------------- SFT


def to_sft(value: Any, where: str) -> SFTExample:
    """Normalise one SFT record: `messages`, `prompt`/`completion`, `conversations` (ShareGPT), alpaca
    `instruction`/`input`/`output` or `text`."""
    return read_sft(value, where)[0]


def read_sft(value: Any, where: str) -> tuple[SFTExample, list[str]]:
    """`to_sft`, plus the keys of the record that were not used.

    A conversation's completion is every turn from the first assistant turn on (the loss covers each assistant
    turn in it; see encode.py), its prompt the turns before."""
    row = new_row(value, where, "sft")
    try:
        return _read_sft(row, where)
    except DataError:
        if detect(value)[0]:  # a pair layout, and no SFT layout beside it
            raise row.error("this is preference data (a chosen and a rejected answer), and SFT trains on one "
                            "answer a record; train it with `preftune dpo`, or give SFT records") from None
        raise


def _read_sft(row: Row, where: str) -> tuple[SFTExample, list[str]]:
    for mark in ("label", "kto_tag"):
        if not row.holds(mark) or (mark == "label" and row.holds("text") and not row.holds("completion")):
            continue  # a label beside bare text is a classification set's class, not a rating: reported unused
        if row.get(mark) in (False, 0, "false", "False", "0"):  # a rating, read: this completion is undesirable
            raise row.error(f"the completion is marked undesirable ({mark}: false), and SFT trains on every "
                            "completion it reads; keep only the desirable ones for SFT")
    if row.holds("messages") or row.holds("conversations"):
        if row.holds("messages"):
            system, turns = split_system(row.messages("messages"))
        else:
            system, turns = split_system(sharegpt_messages(row, "conversations"))
        example = _sft_from_messages(row, turns, row.system_beside(system))
    elif answer := _completion_key(row):
        # TRL's prompt/completion (the answer under another name too: prompt/response), text or turns
        if isinstance(row.get(answer), list):
            system, prompt = split_system(row.messages("prompt") if row.has("prompt") else [])
            example = SFTExample(row.messages(answer), prompt or None, row.system_beside(system), where)
            row.require_open_prompt(prompt, example.completion)
        else:
            prompt = row.optional_text("prompt")  # a system prompt goes before a prompt, as in a text pair
            if not row.text(answer).strip():
                raise row.error(f"the {answer} is empty; training on it teaches the model to stop at once")
            example = SFTExample(row.text(answer), prompt, row.optional_text("system") if prompt else None,
                                 where)
    elif fields := sft_fields(row.value):
        # Alpaca and its kin (LLaMA-Factory's rule, as for preference records): history, then question + input
        # as the user turn, then the answer: the conversation a `messages` record would hold, trained the same
        # way (every assistant turn, the history's too). A `text` column beside them (the original Alpaca
        # release pre-renders the prompt into it) is reported unused, not trained on twice.
        question, answer = fields
        if not row.text(answer).strip():
            raise row.error(f"the answer ({answer!r}) is empty; training on it teaches the model to stop at once")
        user = question_turn(row, question)
        if not user["content"].strip():
            raise row.error(f"the question ({question!r}) is empty; the answer would be trained on no question")
        turns = history_turns(row) + [user, {"role": "assistant", "content": row.text(answer)}]
        example = _sft_from_messages(row, turns, system_field(row))
        example.text_fields = True
    elif row.holds("text"):
        if row.holds("role") or {"message_id", "parent_id"} <= row.value.keys():
            # OpenAssistant's flat export: one message of a tree a row, the user's among them
            raise row.error("a row of one message ('text' beside 'role' or message/parent ids: a message tree, "
                            "as OpenAssistant exports it), not an example; build each conversation into a "
                            "'messages' list first")
        if not row.text("text").strip():
            raise row.error("'text' is empty; there is nothing to train on")
        example = SFTExample(row.text("text"), None, None, where)
    else:
        seen = ", ".join(map(str, row.value)) or "none"
        hint = f"; {CONVERSATION_HINT}" if conversation_of_messages(row.value) else ""
        raise DataError(f"{where}: cannot read an SFT example from the keys seen ({seen}); expected {SFT_KEYS}{hint}")
    if isinstance(example.completion, list):
        example.tools, example.template_kwargs = row.tools(), row.template_kwargs()
        if all(turn.get(NOT_TRAINED) for turn in example.completion if turn["role"] == "assistant"):
            raise row.error("every assistant turn is marked not to be trained (weight 0 or loss false), so there "
                            "is nothing to train on; fix the marks, or leave the record out")
    return example, row.unused()


CONVERSATION_HINT = "its 'conversation' of role/content turns reads as 'messages': rename the key"


def conversation_of_messages(value: dict) -> bool:
    """Whether `conversation` holds role/content turns (lmsys-chat-1m, WildChat): `messages` by another name."""
    return turn_list(value.get("conversation"), ("role", "content"))


def _completion_key(row: Row) -> str | None:
    """The answer's key of a prompt/completion record: `completion` (beside a prompt, or alone without a question
    field, which `sft_fields` reads), or another answer name beside `prompt` and no question field."""
    if row.holds("completion") and (row.holds("prompt") or not sft_fields(row.value)):
        return "completion"
    if not row.holds("prompt") or sft_fields(row.value):  # a question field: read as the fields (`prompt` unused)
        return None
    return next((k for k in SFT_ANSWERS if row.filled(k)), None)


def _sft_from_messages(row: Row, turns: Messages, system: str | None) -> SFTExample:
    if not turns or turns[-1]["role"] != "assistant":
        raise row.error("the conversation must end with an assistant turn, the one trained on")
    first = next(i for i, turn in enumerate(turns) if turn["role"] == "assistant")
    return SFTExample(turns[first:], turns[:first], system, row.where)
