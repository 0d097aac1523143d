"""Tell a preference record's format from its keys (and, where keys are shared, its value types).

`FORMAT_KEYS` says what each format reads, for detection messages and `--data-format` help; the conversion of
each format lives in conversations.py (message-list layouts) and fields.py (string-field layouts), and
formats.py turns a record into a pair with them.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from .rows import turn_list, type_name

# What each format reads, for detection messages and `--data-format` help.
FORMAT_KEYS = {
    "text": "prompt, chosen, rejected (strings), optional system, optional initial_reason_steps (Step-DPO: after the "
            "prompt)",
    "implicit": "chosen, rejected (whole texts sharing a prompt)",
    "chat": "chosen, rejected (message lists; strings beside a prompt of messages), optional prompt (message list), "
            "optional system, optional tools",
    "hh": "chosen, rejected (\\n\\nHuman: / \\n\\nAssistant: transcripts)",
    "ultrafeedback": "chosen, rejected (message lists: answers, or whole conversations), prompt (string; needed "
                     "with answers alone), score_chosen, score_rejected",
    "orca": "system, question or input, chosen, rejected (strings)",
    "alpaca": "instruction, optional input, chosen, rejected (strings), optional system, history ([user, assistant] "
              "pairs)",
    "alpaca_ranking": "instruction (or input alone), optional input, output ([chosen, rejected]: LLaMA-Factory's "
                      "ranking form), optional system, history",
    "sharegpt": "conversations [{from, value}], chosen, rejected ({from, value} or strings), optional system, tools",
    "ultrainteract": "trajectory ([{from, value}]: the prompt's turns, UltraInteract's pairs), chosen, rejected "
                     "(strings)",
    "openai": "messages [{role, content}], chosen, rejected ({role, content}, lists of them, or strings), optional "
              "system, optional tools",
    "openai_preference": "input {messages, optional tools}, preferred_output, non_preferred_output ([{role, "
                         "content}]: OpenAI's preference fine-tuning form)",
    "medicalgpt": "question, response_chosen, response_rejected, optional system, history ([user, assistant] pairs)",
    "chat_messages": "chosen_messages, rejected_messages (whole conversations; LLaMA-Factory v1), optional system, "
                     "optional tools",
    "swift": "messages (ending with the chosen assistant turn), or query, response (the chosen answer) and "
             "history; rejected_response (ms-swift), optional system, optional tools",
    "pku_better": "prompt, response_0, response_1, better_response_id (PKU-SafeRLHF: the more helpful answer "
                  "chosen)",
    "pku_safer": "prompt, response_0, response_1, safer_response_id (PKU-SafeRLHF: the safer answer chosen)",
    "chosen_response": "chosen_response, rejected_response (NeMo-Aligner, argilla), with prompt (text, or messages "
                       "with the answers as messages) or instruction (turns: optional input, system)",
    "helpsteer3": "context (message list), response1, response2, overall_preference (HelpSteer3: below 0, "
                  "response1 preferred; above 0, response2)",
    "stack_exchange": "question, response_j (preferred), response_k",
    "shp": "history, human_ref_A, human_ref_B, labels (1 = A preferred)",
}
FORMAT_NAMES = tuple(FORMAT_KEYS)
# The keys that hold a pair's two answers in some layout: a record with one of them is preference data.
PAIR_ANSWER_KEYS = {"chosen", "rejected", "response_0", "response_1", "response1", "response2", "response_j",
                    "response_k", "human_ref_A", "human_ref_B", "chosen_response", "rejected_response",
                    "response_chosen", "response_rejected", "preferred_output", "non_preferred_output",
                    "chosen_messages", "rejected_messages"}


def _strings(value: dict, *keys: str) -> bool:
    return all(isinstance(value.get(k), str) for k in keys)


def _hh_texts(value: dict) -> bool:
    texts = [t for t in (value["chosen"], value["rejected"]) if isinstance(t, str)]
    # some copies drop the blank line before the first turn (parse_hh reads them too)
    return bool(texts) and all(("\n\nHuman:" in t or t.startswith("Human: ")) and "\n\nAssistant:" in t
                               for t in texts)


def _whole_conversations(value: dict) -> bool:
    """Whether `chosen` is a message list holding a user or system turn: the whole conversation, not an answer."""
    chosen = value.get("chosen")
    return isinstance(chosen, list) and any(isinstance(m, dict) and m.get("role") in ("user", "system")
                                            for m in chosen)


# (format, why, test of the record's keys and value types), first match wins. `why` is said when the record
# also fits a later rule, so a choice between two readings is never silent.
_RULES: list[tuple[str, str, Callable[[dict, set], bool]]] = [
    ("sharegpt", "it has 'conversations'", lambda v, k: "conversations" in k),
    ("ultrainteract", "its 'trajectory' holds {from, value} turns",
     lambda v, k: turn_list(v.get("trajectory"), ("from",))),
    ("swift", "it has 'rejected_response' beside 'messages', or 'query' and 'response'",
     lambda v, k: "rejected_response" in k and ("messages" in k or {"query", "response"} <= k)),
    # UltraFeedback-binarized copies carry `messages` too, a copy of the chosen conversation: not a prompt
    ("openai", "it has 'messages'", lambda v, k: "messages" in k and not _whole_conversations(v)),
    ("openai_preference", "it has preferred_output/non_preferred_output",
     lambda v, k: {"preferred_output", "non_preferred_output"} <= k),
    ("alpaca_ranking", "its 'output' is a list (LLaMA-Factory's ranking form: chosen first)",
     lambda v, k: bool({"instruction", "input"} & k) and isinstance(v.get("output"), list)),
    ("medicalgpt", "it has response_chosen/response_rejected", lambda v, k: {"response_chosen",
                                                                             "response_rejected"} <= k),
    ("chat_messages", "it has chosen_messages/rejected_messages",
     lambda v, k: {"chosen_messages", "rejected_messages"} <= k),
    ("chosen_response", "it has chosen_response/rejected_response",
     lambda v, k: {"chosen_response", "rejected_response"} <= k),
    ("helpsteer3", "it has response1/response2 and overall_preference",
     lambda v, k: {"context", "response1", "response2", "overall_preference"} <= k),
    ("stack_exchange", "it has response_j/response_k", lambda v, k: {"response_j", "response_k"} <= k),
    # PKU-SafeRLHF rates each pair twice; with both ids there, which is "chosen" is the user's to say
    ("pku_better", "it has better_response_id", lambda v, k: {"response_0", "response_1", "better_response_id"} <= k
     and "safer_response_id" not in k),
    ("pku_safer", "it has safer_response_id", lambda v, k: {"response_0", "response_1", "safer_response_id"} <= k
     and "better_response_id" not in k),
    ("shp", "it has human_ref_A/human_ref_B", lambda v, k: {"human_ref_A", "human_ref_B"} <= k),
    # Magpie's DPO sets keep the instruction beside answers that are whole conversations: those are chat's
    ("alpaca", "it has 'instruction'", lambda v, k: "instruction" in k and not isinstance(v["chosen"], list)),
    ("orca", "it has 'question', or 'input' without 'prompt'",
     lambda v, k: ("question" in k or ("input" in k and not {"prompt", "instruction"} & k))
     and not isinstance(v["chosen"], list)),
    ("ultrafeedback", "its answers are message lists with a string prompt or with score_chosen/score_rejected",
     lambda v, k: isinstance(v["chosen"], list)
     and (isinstance(v.get("prompt"), str) or ("prompt" not in k and {"score_chosen", "score_rejected"} <= k))),
    ("chat", "its answers, or its prompt, are message lists",
     lambda v, k: isinstance(v["chosen"], list) or isinstance(v.get("prompt"), list)),
    ("text", "it has a string 'prompt'", lambda v, k: "prompt" in k),
    ("hh", "its answers are Human/Assistant transcripts", lambda v, k: _strings(v, "chosen") and _hh_texts(v)),
    ("implicit", "its answers are strings", lambda v, k: _strings(v, "chosen")),
]
# Their answers are not called chosen/rejected.
_PAIRED_ELSEWHERE = ("openai_preference", "alpaca_ranking", "medicalgpt", "chat_messages", "stack_exchange", "shp",
                     "swift", "pku_better", "pku_safer", "chosen_response", "helpsteer3")


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


def _named_keys(reads: str) -> set[str]:
    """The keys a `FORMAT_KEYS` text names: its words outside parentheses (which hold notes on the values)."""
    while (bare := re.sub(r"\([^()]*\)", "", reads)) != reads:
        reads = bare
    return set(re.findall(r"\w+", reads)) - {"optional", "or", "with", "and"}


def unknown_format_message(value: Any, where: str, formats: dict[str, str] = FORMAT_KEYS) -> str:
    """The record's keys, the `formats` that read some of them (with what each reads), and the other formats'
    names: the whole list with every format's keys would be a line of some 2,000 characters."""
    seen = ", ".join(map(str, value)) if isinstance(value, dict) else type_name(value)
    keys = {str(k) for k in value} if isinstance(value, dict) else set()
    if {"better_response_id", "safer_response_id"} <= keys:
        return (f"{where}: PKU-SafeRLHF's pairs are rated twice, by helpfulness (better_response_id) and by safety "
                "(safer_response_id); pass --data-format pku_better or pku_safer to say which answer is chosen")
    one_sided = [k for k, other in (("rejected", "chosen"), ("chosen", "rejected")) if k in keys and other not in keys]
    if one_sided and formats is FORMAT_KEYS:
        given, missing = one_sided[0], {"rejected": "chosen", "chosen": "rejected"}[one_sided[0]]
        return (f"{where}: a {given!r} answer without a {missing!r} one (keys seen: {seen}); name the two answers "
                "'chosen' and 'rejected' (ms-swift's form: 'messages' ending with the chosen answer, and the other "
                "answer as 'rejected_response')")
    near = [name for name, reads in formats.items() if keys & _named_keys(reads)]
    close = f" Formats that read some of these keys: {'; '.join(f'{n} ({formats[n]})' for n in near)}." \
        if near else ""
    others = ", ".join(name for name in formats if name not in near)
    return (f"{where}: cannot tell the data format from the keys seen ({seen}).{close} "
            f"{'Other formats' if near else 'Known formats'}: {others} (README, 'Data', lists their keys). "
            "Rename the keys, or pass --data-format to force one")
