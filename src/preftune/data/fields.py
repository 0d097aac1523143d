"""Preference layouts whose prompt and answers are strings: text, implicit, HH-RLHF, Orca, Alpaca (and its
ranking form), MedicalGPT, Stack Exchange, SHP.

Each layout is a function `row -> (pair, score_gap)` (see formats.py). HH-RLHF transcripts are kept lossless:
each turn's content is the exact text between two `"\\n\\nHuman: "` / `"\\n\\nAssistant: "` markers (leading and
trailing spaces, empty turns and a stray "Human:" inside an answer included), so `hh_transcript(prompt + chosen)`
gives back the original string.
"""

from __future__ import annotations

import os
import re
from typing import Callable

from .conversations import Converted, answer_messages, message_pair, shared_turns
from .records import Messages, PreferencePair
from .rows import Row, turn_list, type_name
from .turns import QUESTIONS, history_turns, question_turn, system_field

# Turn boundaries for an implicit text prompt, most specific first; the prompt keeps the marker.
_TEXT_BOUNDARIES = ("\n\nAssistant:", "Assistant:", "### Response:", "\n")


def _shared_text_prompt(chosen: str, rejected: str) -> str:
    """The shared start of two whole texts, up to the last turn marker in it; without a marker, up to the last
    space before they part (the words they share: "The capital is" of "... is Paris." and "... is Rome."), which
    gives the ids TRL gets by cutting where the joint tokenisations diverge; "" when they differ in their first
    word (trained whole)."""
    common = os.path.commonprefix([chosen, rejected])
    for marker in _TEXT_BOUNDARIES:
        cut = common.rfind(marker)
        if cut >= 0:
            return common[:cut + len(marker)]
    return common[:max(common.rfind(" "), common.rfind("\t"), 0)]


# --------------------------------------------------------------------------- HH-RLHF transcripts
_HH_MARKER = re.compile(r"\n\n(Human|Assistant): ")
_HH_BARE_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):(?! )")
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


# --------------------------------------------------------------------------- one function a layout
def _transcripts_beside_their_prompt(prompt: str, chosen: str, rejected: str) -> bool:
    """Whether both answers are whole HH-RLHF transcripts that begin with the prompt (some copies keep the
    prompt's transcript as a column beside them): read as transcripts, the prompt is trained once, not twice."""
    core = prompt.strip()
    return bool(core) and all(_HH_MARKER.search("\n\n" + a.lstrip()) and "\n\nAssistant:" in "\n\n" + a.lstrip()
                              and a.lstrip().startswith(core) for a in (chosen, rejected))


def _text(row: Row) -> Converted:
    prompt = row.text("prompt")
    if row.filled("initial_reason_steps"):  # Step-DPO: the steps before the first one the answers differ in
        prompt += row.text("initial_reason_steps")
    chosen, rejected = row.text("chosen"), row.text("rejected")
    if _transcripts_beside_their_prompt(prompt, chosen, rejected):
        pair, gap = _hh(row)
        written = hh_transcript(pair.prompt, pair.system)
        if prompt.strip() in (written.strip(), (written + "\n\nAssistant:").strip()):  # the column is that prompt
            return pair, gap
    return PreferencePair(prompt, chosen, rejected, row.optional_text("system"), row.where), None


def _implicit(row: Row) -> Converted:
    turns = [key for key, value in row.value.items() if key not in ("chosen", "rejected")
             and turn_list(value, ("role", "content"), ("from", "value"))]
    if turns:  # RLHFlow's context_messages, say: the real prompt, where the answers' shared start would be taken
        raise row.error(f"{turns[0]!r} holds conversation turns, likely the prompt, which an implicit pair (its "
                        f"prompt the answers' shared start) does not read; name it 'prompt' (the turns before "
                        "the answers), or drop it if it is not the prompt")
    chosen, rejected = row.text("chosen"), row.text("rejected")
    prompt = _shared_text_prompt(chosen, rejected)
    return PreferencePair(prompt, chosen[len(prompt):], rejected[len(prompt):], None, row.where), None


def _hh(row: Row) -> Converted:
    for name in ("chosen", "rejected"):
        if row.text(name).endswith("\n\nAssistant:"):  # the marker's space is missing when the reply is empty
            raise row.error(f"{name} answer is empty (the transcript ends with an 'Assistant:' that says nothing)")
    preamble, chosen = parse_hh(row.text("chosen"))
    other, rejected = parse_hh(row.text("rejected"))
    for name, before in (("chosen", preamble), ("rejected", other)):
        if bare := _HH_BARE_MARKER.search(before):  # else the first turns would pass for a system prompt
            raise row.error(f"{name}: {bare.group(0)!r} without a space after it, where HH-RLHF transcripts have "
                            f"{bare.group(0) + ' '!r}; add the space, or give prompt, chosen and rejected as fields")
    if preamble != other:
        raise row.error("chosen and rejected have different text before their first turn")
    n = shared_turns(chosen, rejected)
    return PreferencePair(chosen[:n], chosen[n:], rejected[n:], preamble or None, row.where), None


def _turn_fields(row: Row, prompt: Messages, chosen: str, rejected: str) -> Converted:
    """A record whose text fields are turns: system, earlier turns, the user turn, the two answers' texts."""
    answers = [[{"role": "assistant", "content": text}] for text in (chosen, rejected)]
    return PreferencePair(prompt, *answers, system_field(row), row.where, text_fields=True), None


def _orca(row: Row) -> Converted:
    prompt = question_turn(row, "question" if row.filled("question") or not row.holds("input") else "input")
    return _turn_fields(row, [prompt], row.text("chosen"), row.text("rejected"))


def _alpaca(row: Row) -> Converted:
    prompt = history_turns(row) + [question_turn(row, "instruction")]
    return _turn_fields(row, prompt, row.text("chosen"), row.text("rejected"))


def _alpaca_ranking(row: Row) -> Converted:
    """LLaMA-Factory's older preference layout: alpaca fields, with `output` the list [chosen, rejected] (the
    question in `input` when there is no `instruction`)."""
    output = row.get("output")
    if not isinstance(output, list) or len(output) != 2:
        got = f"a list of {len(output)}" if isinstance(output, list) else type_name(output)
        raise row.error(f"'output' must be a list of two answers, [chosen, rejected], got {got}")
    question = "instruction" if row.filled("instruction") or not row.holds("input") else "input"
    prompt = history_turns(row) + [question_turn(row, question)]
    return _turn_fields(row, prompt, row.text("output[0]", output[0]), row.text("output[1]", output[1]))


def _medicalgpt(row: Row) -> Converted:
    prompt = history_turns(row) + [{"role": "user", "content": row.text("question")}]
    return _turn_fields(row, prompt, row.text("response_chosen"), row.text("response_rejected"))


def _pku(rated_by: str) -> Callable[[Row], Converted]:
    """PKU-SafeRLHF's pairs: `prompt`, `response_0`, `response_1`, and the id (0 or 1) of the answer `rated_by`
    prefers; the user's turn and the answers are text fields."""
    def convert(row: Row) -> Converted:
        if isinstance(row.get(rated_by), bool) or row.number(rated_by) not in (0, 1):  # 1, "1" (CSV) and 1.0 alike
            raise row.error(f"{rated_by!r} must be 0 or 1 (the index of the preferred response), got "
                            f"{row.get(rated_by)!r:.40}")
        chosen = int(row.number(rated_by))
        answers = row.text("response_0"), row.text("response_1")
        return _turn_fields(row, [{"role": "user", "content": row.text("prompt")}], answers[chosen],
                            answers[1 - chosen])
    return convert


def _chosen_response(row: Row) -> Converted:
    """Answers named chosen_response / rejected_response (NeMo-Aligner, argilla): beside a text `prompt`, text as
    a text pair is (NeMo-Aligner's prompts are rendered already); beside a prompt of messages, messages (its
    other form); beside a question field, turns as alpaca's are."""
    if isinstance(row.get("prompt") if row.holds("prompt") else None, list):  # NeMo-Aligner's message form
        chosen, rejected = (answer_messages(row, k) for k in ("chosen_response", "rejected_response"))
        return message_pair(row, chosen, rejected, row.messages("prompt")), None
    chosen, rejected = row.text("chosen_response"), row.text("rejected_response")
    if row.filled("prompt") or not any(row.filled(k) for k in QUESTIONS):
        return PreferencePair(row.text("prompt"), chosen, rejected, row.optional_text("system"), row.where), None
    question = next(k for k in QUESTIONS if row.filled(k))
    return _turn_fields(row, history_turns(row) + [question_turn(row, question)], chosen, rejected)


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
        gap = abs(row.number("score_A", finite=False) - row.number("score_B", finite=False))
    return PreferencePair(row.text("history"), chosen, rejected, None, row.where), gap


FIELD_LAYOUTS: dict[str, Callable[[Row], Converted]] = {
    "text": _text, "implicit": _implicit, "hh": _hh, "orca": _orca, "alpaca": _alpaca,
    "alpaca_ranking": _alpaca_ranking, "medicalgpt": _medicalgpt,
    "stack_exchange": _stack_exchange, "shp": _shp, "pku_better": _pku("better_response_id"),
    "pku_safer": _pku("safer_response_id"), "chosen_response": _chosen_response}
