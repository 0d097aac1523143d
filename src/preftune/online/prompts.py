"""The prompts of online training: a JSONL / JSON file (or a list in memory) of records with `prompt` (text or
a list of {role, content} messages) and an optional `system`; a bare string or message list is a prompt too. Any other
key is an error rather than silently ignored (preference files work too: see `read_prompts`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import DataError

# Keys of preference records that hold answers: read from a preference file, they are not used by online training.
ANSWER_KEYS = ("chosen", "rejected", "score_chosen", "score_rejected")


def read_prompts(source, what: str = "--prompts") -> tuple[list[dict], int]:
    """(prompt records {prompt, system, where}, how many records had answers left out) from a path or a list.
    Keys of preference records (chosen, rejected and their scores) are allowed and left out, since the policy
    writes the answers (the caller reports the count); any other key is a `DataError` naming the record."""
    if isinstance(source, (str, Path)):
        rows = _read_file(Path(source), what)
        name = str(source)
    else:
        rows = [(f"{what} record {i + 1}", r) for i, r in enumerate(source)]
        name = what
    records, with_answers = [], 0
    for where, row in rows:
        if isinstance(row, str) or _messages(row):
            row = {"prompt": row}
        if not isinstance(row, dict) or "prompt" not in row:
            raise DataError(f"{where}: expected a string or a record with 'prompt', got "
                            f"{type(row).__name__ if not isinstance(row, dict) else 'keys ' + ', '.join(row)}")
        unknown = sorted(set(row) - {"prompt", "system", *ANSWER_KEYS})
        if unknown:
            raise DataError(f"{where}: unknown key(s) {', '.join(unknown)}; a prompt record holds prompt and "
                            f"optionally system")
        prompt = row["prompt"]
        if not (isinstance(prompt, str) and prompt) and not _messages(prompt):
            raise DataError(f"{where}: 'prompt' must be non-empty text or a list of {{role, content}} messages")
        if row.get("system") is not None and not isinstance(row["system"], str):
            raise DataError(f"{where}: 'system' must be text")
        with_answers += any(k in row for k in ANSWER_KEYS)
        records.append({"prompt": prompt, "system": row.get("system"), "where": where})
    if not records:
        raise DataError(f"{name}: no prompts")
    kinds = [isinstance(r["prompt"], list) for r in records]
    if any(k != kinds[0] for k in kinds):
        odd = records[kinds.index(not kinds[0])]
        raise DataError(f"{odd['where']}: a {'message-list' if not kinds[0] else 'text'} prompt among "
                        f"{'text' if not kinds[0] else 'message-list'} prompts; give all prompts of a run as text, "
                        f"or all as message lists")
    return records, with_answers


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


def _read_file(path: Path, what: str) -> list[tuple[str, object]]:
    if not path.is_file():
        raise DataError(f"{what} {path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of prompt records")
        return [(f"{path} record {i + 1}", r) for i, r in enumerate(rows)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return out
