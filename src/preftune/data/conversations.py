"""Preference layouts whose answers are message lists: chat, OpenAI messages (and OpenAI's preference
fine-tuning form), ShareGPT, UltraFeedback, LLaMA-Factory v1, ms-swift.

Each layout is a function `row -> (pair, score_gap)` (see formats.py). The prompt is either given or the run of
turns both answers share; a leading system turn is kept apart as the pair's system prompt.
"""

from __future__ import annotations

from typing import Callable

from .records import Messages, PreferencePair
from .rows import Row, type_name
from .turns import history_turns, question_turn, sharegpt_messages, system_field

Converted = tuple[PreferencePair, "float | None"]  # (pair, chosen minus rejected score or None)


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


# --------------------------------------------------------------------------- one function a layout
def _chat(row: Row) -> Converted:
    # A string answer beside a prompt of messages is that answer's assistant turn.
    return message_pair(row, answer_messages(row, "chosen"), answer_messages(row, "rejected"),
                         row.messages("prompt") if row.has("prompt") else None), None


def message_pair(row: Row, chosen: Messages, rejected: Messages, full_prompt: Messages | None) -> PreferencePair:
    """A pair of message lists, with the prompt given or (None) the run of turns the answers share."""
    if full_prompt is None:
        pair = _conversations(row, chosen, rejected)
    else:
        system, prompt = split_system(full_prompt)
        # Answers may repeat the prompt (whole conversations) or hold only the assistant turns.
        chosen = _strip_prefix(_strip_prefix(chosen, full_prompt), prompt)
        rejected = _strip_prefix(_strip_prefix(rejected, full_prompt), prompt)
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if answer and answer[0]["role"] in ("user", "system"):
                raise row.error(f"{name} answer starts with a {answer[0]['role']} turn: it holds turns of its own "
                                "before the answer, and does not repeat the prompt's exactly either; give the "
                                "answer's turns alone, or the whole conversation with the prompt's turns unchanged")
        pair = PreferencePair(prompt, chosen, rejected, system, row.where)
    pair.system = row.system_beside(pair.system)  # a system column beside the turns, as LLaMA-Factory keeps it
    pair.tools = row.tools()
    return pair


def _ultrafeedback(row: Row) -> Converted:
    chosen, rejected = row.messages("chosen"), row.messages("rejected")
    if chosen and chosen[0]["role"] == "assistant":  # answers alone: the prompt string is the user turn
        prompt = [{"role": "user", "content": row.text("prompt")}]
        pair = PreferencePair(prompt, chosen, rejected, None, row.where)
    else:
        pair = _conversations(row, chosen, rejected)
        if row.holds("prompt") and pair.prompt and row.value["prompt"] == pair.prompt[-1]["content"]:
            row.has("prompt")  # the prompt string repeats the conversations' last user turn: read, not lost
    pair.system = row.system_beside(pair.system)
    gap = None
    if row.has("score_chosen") or row.has("score_rejected"):
        gap = row.number("score_chosen", finite=False) - row.number("score_rejected", finite=False)
    return pair, gap


def _sharegpt_turns(key: str) -> Callable[[Row], Converted]:
    """ShareGPT-style pairs: the prompt's `{from, value}` turns under `key` (LLaMA-Factory's `conversations`,
    UltraInteract's `trajectory`), the answers as turns or strings."""
    def convert(row: Row) -> Converted:
        system, prompt = split_system(sharegpt_messages(row, key))
        system = row.system_beside(system)  # LLaMA-Factory's system column
        chosen, rejected = sharegpt_messages(row, "chosen"), sharegpt_messages(row, "rejected")
        return PreferencePair(prompt, chosen, rejected, system, row.where, row.tools()), None
    return convert


def _openai(row: Row) -> Converted:
    prompt = row.messages("messages")
    return message_pair(row, answer_messages(row, "chosen"), answer_messages(row, "rejected"), prompt), None


def answer_messages(row: Row, key: str) -> Messages:
    """An answer given as messages, or as a string: one assistant turn."""
    value = row.get(key)
    return row.messages(key, {"role": "assistant", "content": value} if isinstance(value, str) else value)


def _openai_preference(row: Row) -> Converted:
    """OpenAI's preference fine-tuning records: `input` holds the prompt's `messages` (and `tools`);
    `preferred_output` and `non_preferred_output` hold the answers' messages."""
    value = row.get("input")
    if not isinstance(value, dict):
        raise row.error(f"'input' must be an object holding 'messages', got {type_name(value)}")
    given = Row(value, row.where, row.fmt, row.expects)
    pair = message_pair(given, answer_messages(row, "preferred_output"), answer_messages(row, "non_preferred_output"),
                         given.messages("messages"))
    pair.system = row.system_beside(pair.system)  # a system column beside `input`, as beside other layouts
    row.unread_parts.update(f"input.{key}" for key in given.unused())
    return pair, None


def _chat_messages(row: Row) -> Converted:
    return message_pair(row, row.messages("chosen_messages"), row.messages("rejected_messages"), None), None


def _swift(row: Row) -> Converted:
    """ms-swift's preference records: the conversation ends with the chosen answer; `rejected_response` is the
    other answer to the same turns (a string, or an assistant message). Its older form gives the conversation as
    `history`, `query` and `response` (the chosen answer) text fields."""
    if not row.value.get("messages") and row.holds("query"):
        prompt = history_turns(row) + [question_turn(row, "query")]
        chosen = [{"role": "assistant", "content": row.text("response")}]
        pair = PreferencePair(prompt, chosen, answer_messages(row, "rejected_response"), system_field(row), row.where,
                              row.tools(), text_fields=True)
        return pair, None
    turns = row.messages("messages")
    if not turns or turns[-1]["role"] != "assistant":
        raise row.error("'messages' must end with the chosen assistant turn, which 'rejected_response' answers "
                        "against")
    rejected = answer_messages(row, "rejected_response")
    system, prompt = split_system(turns[:-1])
    return PreferencePair(prompt, turns[-1:], rejected, row.system_beside(system), row.where, row.tools()), None


def _helpsteer3(row: Row) -> Converted:
    """HelpSteer3's pairs: the conversation so far in `context`, two answers, and `overall_preference` from -3
    (response1 much better) to 3 (response2 much better); its size is the score gap. At 0 the raters prefer
    neither: the gap is 0 and the order means nothing (`load.read_pairs` drops such a pair, saying so)."""
    system, prompt = split_system(row.messages("context"))
    preference = row.number("overall_preference")  # a finite number, NaN refused
    first, second = ([{"role": "assistant", "content": row.text(k)}] for k in ("response1", "response2"))
    chosen, rejected = (first, second) if preference < 0 else (second, first)
    return PreferencePair(prompt, chosen, rejected, row.system_beside(system), row.where), abs(preference)


MESSAGE_LAYOUTS: dict[str, Callable[[Row], Converted]] = {
    "chat": _chat, "ultrafeedback": _ultrafeedback, "sharegpt": _sharegpt_turns("conversations"),
    "ultrainteract": _sharegpt_turns("trajectory"), "openai": _openai,
    "openai_preference": _openai_preference, "chat_messages": _chat_messages, "swift": _swift,
    "helpsteer3": _helpsteer3}
