"""`preftune data check`: find what would go wrong with a data file before a run starts.

Problems come from three places: records that cannot be read (the loader's messages), pairs that read but
cannot teach anything (identical answers, duplicates, empty answers), and, with a tokenizer, pairs that will
be dropped or truncated at the configured lengths. Unpaired feedback (KTO) and SFT files are checked the same
way, for what each can have wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .load import SFTData, UnpairedData, read_pairs, read_sft_source, read_unpaired_source
from .records import LoadReport, PreferencePair, SFTExample, UnpairedExample
from .rows import NOT_TRAINED
from .unpaired import UNPAIRED_FORMATS

# Long enough that nothing is cut: the lengths a pair would have with no limit.
_NO_LIMIT = 10**9
PERCENTILES = (50, 90, 99)
_SHOWN = 5  # problems listed per kind without --all
_WHERE = re.compile(r".*? (?:line|record) (\d+):")  # the place at the start of a problem message


@dataclass
class CheckResult:
    """What `check_pairs` found. `problems` are (kind, message) in file order; `lengths` maps prompt/chosen/
    rejected to token counts, one per pair kept. An unpaired feedback file has `unpaired` examples, no pairs; an
    SFT file `sft` examples (and `format` "sft")."""

    source: str
    format: str
    records: int
    pairs: list[PreferencePair]
    report: LoadReport
    problems: list[tuple[str, str]] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)
    unpaired: list[UnpairedExample] = field(default_factory=list)
    sft: list[SFTExample] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def by_kind(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for kind, message in self.problems:
            groups.setdefault(kind, []).append(message)
        return groups


def check_pairs(source: str, *, data_format: str | None = None, split: str = "train", tokenizer: Any = None,
                max_length: int = 1024, max_prompt_length: int | None = None,
                raw_text_prompts: bool = False) -> CheckResult:
    """Read `source` keeping every readable pair (or KTO or SFT example), and list every problem found, each
    naming its record."""
    limits = (max_length, max_prompt_length, raw_text_prompts)
    try:
        if data_format in UNPAIRED_FORMATS:
            raise UnpairedData("forced")
        if data_format == "sft":
            raise SFTData("forced")
        pairs, report = read_pairs(source, data_format=data_format, split=split, skip_bad_records=True)
    except SFTData:
        examples, report = read_sft_source(source, split=split, skip_bad_records=True)
        result = CheckResult(source, report.format, report.records, [], report, sft=examples)
        content = [("answer without text", f"{ex.where}: the assistant turns have no text (only the end-of-turn "
                                           "is trained)") for ex in examples if _without_text(ex.completion)]
        content += _duplicates(examples, lambda ex: [ex.system, ex.prompt, ex.completion, ex.tools,
                                                     ex.template_kwargs])
        return _finish(result, content, sft_token_problems, examples, tokenizer, limits)
    except UnpairedData:
        examples, report = read_unpaired_source(source, data_format=data_format, split=split,
                                                skip_bad_records=True)
        result = CheckResult(source, report.format, report.records, [], report, unpaired=examples)
        return _finish(result, [], unpaired_token_problems, examples, tokenizer, limits)
    result = CheckResult(source, report.format, report.records, pairs, report)
    return _finish(result, content_problems(pairs), token_problems, pairs, tokenizer, limits)


def _finish(result: CheckResult, content: list[tuple[str, str]], token_check, items: list, tokenizer: Any,
            limits: tuple) -> CheckResult:
    """`result` with its problems: unreadable records, `content`, and with a tokenizer `token_check`'s."""
    result.problems += [("unreadable record", message) for message in result.report.skipped]
    result.problems += content
    if tokenizer is not None:
        problems, result.lengths = token_check(items, tokenizer, *limits)
        result.problems += problems
    result.problems.sort(key=lambda problem: _position(problem[1]))  # file order, whichever check found it
    return result


def _position(problem: str) -> int:
    found = _WHERE.match(problem)
    return int(found.group(1)) if found else 0


def content_problems(pairs: list[PreferencePair]) -> list[tuple[str, str]]:
    """Pairs that read fine but teach nothing, or teach the same thing twice."""
    problems: list[tuple[str, str]] = []
    for pair in pairs:
        if not pair.prompt and not pair.system:
            problems.append(("no prompt", f"{pair.where}: no prompt was found before the answers; chosen and "
                                          f"rejected are trained as whole texts"))
        if _repeats_prompt(pair):
            problems.append(("answers repeat the prompt",
                             f"{pair.where}: both answers begin with the whole prompt, so prompt + answer says it "
                             "twice; give the answers alone, or drop the prompt to read them as whole texts"))
        if pair.chosen == pair.rejected:
            problems.append(("identical answers",
                             f"{pair.where}: chosen is identical to rejected; the pair carries no preference"))
        for name in ("chosen", "rejected"):
            if _without_text(getattr(pair, name)):
                problems.append(("answer without text",
                                 f"{pair.where}: the {name} answer has no text (only the end-of-turn is trained)"))
    return problems + _duplicates(pairs, lambda pair: [pair.system, pair.prompt, pair.chosen, pair.rejected,
                                                        pair.tools, pair.template_kwargs])


def _repeats_prompt(pair) -> bool:
    """A text pair whose answers both begin with its whole prompt (TRL, and preftune, train prompt + answer)."""
    prompt = pair.prompt.strip() if isinstance(pair.prompt, str) else ""

    def repeats(answer) -> bool:  # the whole prompt, then a word's end ("1" then "10" is no repeat)
        text = answer.lstrip() if isinstance(answer, str) else ""
        rest = text[len(prompt):len(prompt) + 1]
        return text.startswith(prompt) and not (rest.isalnum() and prompt[-1].isalnum())

    return bool(prompt) and repeats(pair.chosen) and repeats(pair.rejected)


def _without_text(answer) -> bool:
    """A chat answer whose trained assistant turns say nothing (no text, no tool call): only their end-of-turn is
    trained."""
    said = [m for m in answer if m["role"] == "assistant" and not m.get(NOT_TRAINED)] \
        if isinstance(answer, list) else None
    return said is not None and not "".join(m["content"] for m in said).strip() and \
        not any(m.get("tool_calls") for m in said)


def _duplicates(items: list, content) -> list[tuple[str, str]]:
    """Items whose `content(item)` an earlier item has too, each naming the first."""
    problems, seen = [], {}
    for item in items:
        key = json.dumps(content(item))
        if key in seen:
            problems.append(("duplicate", f"{item.where}: duplicate of {seen[key]}"))
        seen.setdefault(key, item.where)
    return problems


def token_problems(pairs: list[PreferencePair], tokenizer: Any, max_length: int, max_prompt_length: int | None,
                   raw_text_prompts: bool = False) -> tuple[list[tuple[str, str]], dict[str, list[int]]]:
    """Pairs that will be dropped or truncated at these lengths, and the untruncated token lengths of all."""
    from .tokenize import tokenize_pair

    problems: list[tuple[str, str]] = []
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    limits = f"--max-length {max_length}" + (f", --max-prompt-length {max_prompt_length}"
                                              if max_prompt_length else "")
    for pair in pairs:
        try:
            full = tokenize_pair(tokenizer, pair, max_length=_NO_LIMIT, max_prompt_length=None,
                                 raw_text_prompts=raw_text_prompts)
        except DataError as exc:  # e.g. tool calls and a template without tool support
            problems.append(("cannot be tokenised", str(exc)))
            continue
        sizes = {"prompt": len(full.prompt_ids), "chosen": len(full.chosen_ids),
                 "rejected": len(full.rejected_ids)}
        for name, size in sizes.items():
            lengths[name].append(size)
        fitted = tokenize_pair(tokenizer, pair, max_length=max_length, max_prompt_length=max_prompt_length,
                               raw_text_prompts=raw_text_prompts)
        counts = ", ".join(f"{name} {size}" for name, size in sizes.items())
        if fitted is None:
            problems.append(("prompt too long, pair dropped", f"{pair.where}: the prompt alone is too long "
                             f"({counts} tokens; {limits}); the pair will be dropped"))
        elif fitted.truncated:
            parts = " and ".join(name for name, cut in zip(sizes, fitted.cut) if cut)
            problems.append(("truncated", f"{pair.where}: will be truncated: {parts} ({counts} tokens; {limits})"))
    return problems, lengths


def unpaired_token_problems(examples: list[UnpairedExample], tokenizer: Any, max_length: int,
                            max_prompt_length: int | None, raw_text_prompts: bool = False):
    """`token_problems` for KTO examples: those that cannot be tokenised, will be dropped (the prompt alone is
    too long) or truncated (prompt and answer; a KL answer, another example's, may be cut too)."""
    from .tokenize import encode_unpaired

    return _one_answer_problems(examples, lambda ex: encode_unpaired(tokenizer, ex, raw_text_prompts), max_length,
                                max_prompt_length)


def sft_token_problems(examples: list[SFTExample], tokenizer: Any, max_length: int, max_prompt_length: int | None,
                       raw_text_prompts: bool = False):
    """`token_problems` for SFT examples: those that cannot be tokenised (nothing left to train included), will be
    dropped (the prompt alone is too long) or truncated. A completion's length counts every token after the
    prompt, the masked turns between assistant turns included."""
    from .tokenize import tokenize_example

    def encode(ex: SFTExample) -> tuple[list[int], list[int]]:
        whole = tokenize_example(tokenizer, ex, max_length=_NO_LIMIT, raw_text_prompts=raw_text_prompts)
        return whole.prompt_ids, whole.answer_ids

    return _one_answer_problems(examples, encode, max_length, max_prompt_length)


def _one_answer_problems(examples: list, encode, max_length: int, max_prompt_length: int | None):
    """Problems and lengths of examples of one answer each, `encode(example)` giving their untruncated (prompt
    ids, answer ids), cut as training cuts them."""
    from .tokenize import _fit

    problems: list[tuple[str, str]] = []
    lengths: dict[str, list[int]] = {"prompt": [], "completion": []}
    limits = f"--max-length {max_length}" + (f", --max-prompt-length {max_prompt_length}"
                                              if max_prompt_length else "")
    for ex in examples:
        try:
            prompt_ids, answer = encode(ex)
        except DataError as exc:
            problems.append(("cannot be tokenised", str(exc)))
            continue
        lengths["prompt"].append(len(prompt_ids))
        lengths["completion"].append(len(answer))
        counts = f"prompt {len(prompt_ids)}, completion {len(answer)}"
        fitted = _fit(prompt_ids, (answer,), max_length, max_prompt_length)
        if fitted is None:
            problems.append(("prompt too long, example dropped", f"{ex.where}: the prompt alone is too long "
                             f"({counts} tokens; {limits}); the example will be dropped"))
        elif any(fitted[2]):
            parts = " and ".join(name for name, cut in zip(("prompt", "completion"), fitted[2]) if cut)
            problems.append(("truncated", f"{ex.where}: will be truncated: {parts} ({counts} tokens; {limits})"))
    return problems, lengths


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles p50/p90/p99 and the max of a list of lengths."""
    ordered = sorted(values)
    if not ordered:
        return {}
    out = {f"p{p}": ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))] for p in PERCENTILES}
    out["max"] = ordered[-1]
    return out


def render_report(result: CheckResult, *, forced: bool, show_all: bool = False) -> str:
    """The human-readable summary `data check` prints: problems grouped by kind, the first few of each."""
    report = result.report
    lines = [f"source: {result.source}", f"format: {result.format} ({'forced' if forced else 'detected'})"]
    if report.detection:
        lines.append(f"  {report.detection}")
    if result.format == "sft":
        chat = sum(example.is_chat for example in result.sft)
        lines.append(f"records: {result.records} read, {len(result.sft)} usable examples ({chat} chat, "
                     f"{len(result.sft) - chat} text), {result.records - len(result.sft)} unreadable")
        lines.append("SFT data: one answer a record, no preference; it is data for `preftune sft`, not for DPO, "
                     "which needs chosen/rejected pairs")
    elif result.unpaired or result.format in UNPAIRED_FORMATS:
        good = sum(example.label for example in result.unpaired)
        lines.append(f"records: {result.records} read, {len(result.unpaired)} usable ({good} desirable, "
                     f"{len(result.unpaired) - good} undesirable), {result.records - len(result.unpaired)} "
                     "unreadable")
        lines.append("unpaired feedback: each record rates one answer; it is data for KTO, not for DPO, which "
                     "needs chosen/rejected pairs")
    else:
        chat = sum(pair.is_chat for pair in result.pairs)
        lines.append(f"records: {result.records} read, {len(result.pairs)} usable pairs ({chat} chat, "
                     f"{len(result.pairs) - chat} text), {result.records - len(result.pairs)} unreadable")
    if report.unused_keys:
        keys = ", ".join(f"{key} ({count})" for key, count in report.unused_keys.most_common())
        lines.append(f"unused keys (not read by format {result.format!r}; records holding each): {keys}")
    if result.lengths and any(result.lengths.values()):
        lines.append("token lengths:")
        width = max(9, *(len(name) + 1 for name in result.lengths))
        for name, values in result.lengths.items():
            stats = "  ".join(f"{key} {value}" for key, value in percentiles(values).items())
            lines.append(f"  {name:<{width}}{stats}")
    if not result.problems:
        lines.append("problems: none")
        return "\n".join(lines)
    lines.append(f"problems: {len(result.problems)}")
    for kind, messages in result.by_kind().items():
        lines.append(f"  {kind}: {len(messages)}")
        shown = messages if show_all else messages[:_SHOWN]
        lines += [f"    {message}" for message in shown]
        if len(messages) > len(shown):
            lines.append(f"    ... and {len(messages) - len(shown)} more (--all lists every one)")
    return "\n".join(lines)
