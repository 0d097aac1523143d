"""`preftune data check`: find what would go wrong with a preference file before a run starts.

Problems come from three places: records that cannot be read (the loader's messages), pairs that read but
cannot teach anything (identical answers, duplicates, empty answers), and, with a tokenizer, pairs that will
be dropped or truncated at the configured lengths.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .load import read_pairs
from .records import PreferencePair

# Long enough that nothing is cut: the lengths a pair would have with no limit.
_NO_LIMIT = 10**9
PERCENTILES = (50, 90, 99)
_WHERE = re.compile(r".*? (?:line|record) (\d+):")  # the place at the start of a problem message


@dataclass
class CheckResult:
    """What `check_pairs` found. `lengths` maps prompt/chosen/rejected to token counts, one per pair kept."""

    source: str
    format: str
    records: int
    pairs: list[PreferencePair]
    problems: list[str] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.problems


def check_pairs(source: str, *, data_format: str | None = None, split: str = "train", tokenizer: Any = None,
                max_length: int = 1024, max_prompt_length: int | None = None) -> CheckResult:
    """Read `source` keeping every readable pair, and list every problem found, each naming its record."""
    pairs, report = read_pairs(source, data_format=data_format, split=split, skip_bad_records=True)
    result = CheckResult(source, report.format, report.records, pairs, list(report.skipped))
    result.problems += content_problems(pairs)
    if tokenizer is not None:
        problems, result.lengths = token_problems(pairs, tokenizer, max_length, max_prompt_length)
        result.problems += problems
    result.problems.sort(key=_position)  # file order, whichever check found the problem
    return result


def _position(problem: str) -> int:
    found = _WHERE.match(problem)
    return int(found.group(1)) if found else 0


def content_problems(pairs: list[PreferencePair]) -> list[str]:
    """Pairs that read fine but teach nothing, or teach the same thing twice."""
    problems, seen = [], {}
    for pair in pairs:
        if pair.chosen == pair.rejected:
            problems.append(f"{pair.where}: chosen is identical to rejected; the pair carries no preference")
        for name in ("chosen", "rejected"):
            answer = getattr(pair, name)
            if isinstance(answer, list) and not "".join(m["content"] for m in answer).strip():
                problems.append(f"{pair.where}: the {name} answer has no text (only the end-of-turn is trained)")
        key = json.dumps([pair.system, pair.prompt, pair.chosen, pair.rejected])
        if key in seen:
            problems.append(f"{pair.where}: duplicate of {seen[key]}")
        else:
            seen[key] = pair.where
    return problems


def token_problems(pairs: list[PreferencePair], tokenizer: Any, max_length: int,
                   max_prompt_length: int | None) -> tuple[list[str], dict[str, list[int]]]:
    """Pairs that will be dropped or truncated at these lengths, and the untruncated token lengths of all."""
    from .tokenize import tokenize_pair

    problems: list[str] = []
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    limits = f"--max-length {max_length}" + (f", --max-prompt-length {max_prompt_length}"
                                              if max_prompt_length else "")
    for pair in pairs:
        try:
            full = tokenize_pair(tokenizer, pair, max_length=_NO_LIMIT, max_prompt_length=None)
        except DataError as exc:  # e.g. chat data and a tokenizer without a chat template
            problems.append(str(exc))
            continue
        sizes = {"prompt": len(full.prompt_ids), "chosen": len(full.chosen_ids),
                 "rejected": len(full.rejected_ids)}
        for name, size in sizes.items():
            lengths[name].append(size)
        fitted = tokenize_pair(tokenizer, pair, max_length=max_length, max_prompt_length=max_prompt_length)
        counts = ", ".join(f"{name} {size}" for name, size in sizes.items())
        if fitted is None:
            problems.append(f"{pair.where}: the prompt alone is too long ({counts} tokens; {limits}); "
                            "the pair will be dropped")
        elif fitted.truncated:
            problems.append(f"{pair.where}: will be truncated ({counts} tokens; {limits})")
    return problems, lengths


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles p50/p90/p99 and the max of a list of lengths."""
    ordered = sorted(values)
    if not ordered:
        return {}
    out = {f"p{p}": ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))] for p in PERCENTILES}
    out["max"] = ordered[-1]
    return out


def render_report(result: CheckResult, *, forced: bool) -> str:
    """The human-readable summary `data check` prints."""
    chat = sum(pair.is_chat for pair in result.pairs)
    lines = [
        f"source: {result.source}",
        f"format: {result.format} ({'forced' if forced else 'detected'})",
        f"records: {result.records} read, {len(result.pairs)} usable pairs ({chat} chat, "
        f"{len(result.pairs) - chat} text), {result.records - len(result.pairs)} unreadable",
    ]
    if result.lengths:
        lines.append("token lengths:")
        for name, values in result.lengths.items():
            stats = "  ".join(f"{key} {value}" for key, value in percentiles(values).items())
            lines.append(f"  {name:<9}{stats}")
    lines.append(f"problems: {len(result.problems)}" if result.problems else "problems: none")
    lines += [f"  {problem}" for problem in result.problems]
    return "\n".join(lines)
