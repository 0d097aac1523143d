"""The prompts of online training: records with `prompt` (text or a list of {role, content} messages) and an
optional `system`, a bare string or message list, or the records of any preference layout preftune reads (their
prompts, the answers left out), from any source training reads (JSONL, JSON, Parquet, CSV, a saved dataset, a
Hub id, a list in memory). Any other key is an error rather than silently ignored."""

from __future__ import annotations

import random
from collections import Counter

from ..data.detect import detect
from ..data.formats import read_pair
from ..data.memory import as_source
from ..data.rows import Row
from ..data.sources import read_rows
from ..errors import DataError

# Keys of preference records that hold answers: read from a preference file, they are not used by online training.
ANSWER_KEYS = ("chosen", "rejected", "score_chosen", "score_rejected")
OWN_KEYS = ("chat_template_kwargs",)  # besides prompt and system: the record's arguments to the chat template
PROMPT_KEYS = "prompt and optionally system and chat_template_kwargs"


def read_prompts(source, what: str = "--prompts", split: str = "train") -> tuple[list[dict], list[str]]:
    """(prompt records {prompt, system, where, template_kwargs}, notes to say) from a path, Hub id or list, its
    `split` for a saved dataset or Hub id. A record of a preference layout gives its prompt and system prompt, its
    answers left out; the notes count those records and name the keys no reader used. Any other record is a
    `DataError` naming it."""
    records, with_answers, unused, said = [], 0, Counter(), []
    for where, row in read_rows(as_source(source, what), split=split):
        if isinstance(row, DataError):
            raise row
        if isinstance(row, str) or _messages(row):
            row = {"prompt": row}
        layout, note = detect(row) if isinstance(row, dict) else (None, None)
        if layout is None and isinstance(row, dict) and {"better_response_id", "safer_response_id"} <= set(row):
            layout = "pku_better"  # rated two ways, which decides only which answer is chosen: not read here
        if isinstance(row, dict) and "prompt" in row and set(row) <= {"prompt", "system", *OWN_KEYS, *ANSWER_KEYS}:
            prompt, system = row["prompt"], row.get("system") or None  # a blank CSV cell: no system prompt
            kwargs = Row(row, where, "prompts", PROMPT_KEYS).template_kwargs()
            with_answers += any(k in row for k in ANSWER_KEYS)
        elif layout:
            pair, _, left = read_pair(row, layout, where)
            if pair.tools:
                raise DataError(f"{where}: the record has tool schemas, which online training does not give the "
                                "model; leave the tools out of its prompts")
            prompt, system, kwargs = pair.prompt, pair.system, pair.template_kwargs
            with_answers += 1
            unused.update(left)
            if note and note not in said:  # a record that fits two layouts: which was read, said once
                said.append(note)
        elif isinstance(row, dict) and "prompt" in row:
            unknown = sorted(set(row) - {"prompt", "system", *OWN_KEYS, *ANSWER_KEYS})
            raise DataError(f"{where}: unknown key(s) {', '.join(unknown)}; a prompt record holds {PROMPT_KEYS} "
                            "(or give a preference file)")
        else:
            raise DataError(f"{where}: expected a string or a record with 'prompt', got "
                            f"{type(row).__name__ if not isinstance(row, dict) else 'keys ' + ', '.join(row)}")
        if not (isinstance(prompt, str) and prompt) and not _messages(prompt):
            raise DataError(f"{where}: 'prompt' must be non-empty text or a list of {{role, content}} messages")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be text")
        if isinstance(prompt, list) and prompt[-1]["role"] not in ("user", "tool"):  # what an answer follows
            raise DataError(f"{where}: the prompt ends with a {prompt[-1]['role']} turn; a prompt to answer ends "
                            "with the user's turn (or a tool's result)")
        records.append({"prompt": prompt, "system": system, "where": where, "template_kwargs": kwargs})
    if not records:
        raise DataError(f"{what}: no prompts")
    kinds = [isinstance(r["prompt"], list) for r in records]
    if any(k != kinds[0] for k in kinds):
        odd = records[kinds.index(not kinds[0])]
        raise DataError(f"{odd['where']}: a {'message-list' if not kinds[0] else 'text'} prompt among "
                        f"{'text' if not kinds[0] else 'message-list'} prompts; give all prompts of a run as text, "
                        f"or all as message lists")
    notes = [f"{what}: {note}" for note in said]
    if with_answers:
        notes.append(f"{what}: {with_answers} records hold answers (chosen/rejected); only their prompts are used")
    if unused:
        keys = ", ".join(f"{key} ({count})" for key, count in unused.most_common())
        notes.append(f"{what}: keys not used, ignored (records holding each): {keys}")
    return records, notes


def split_prompts(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded share `fraction` of the prompts held out for evaluation (at least one)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n = max(1, round(len(records) * fraction))
    if n >= len(records):
        raise DataError(f"eval_split {fraction}: leaves no training prompt out of {len(records)}")
    held = set(order[:n])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def _messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
