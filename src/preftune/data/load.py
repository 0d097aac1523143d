"""The data entry points the trainer calls: read a source, normalise every record, report what was dropped."""

from __future__ import annotations

import math
import random
from typing import Any, Callable, TypeVar

from ..errors import DataError
from .detect import FORMAT_KEYS, FORMAT_NAMES, PAIR_ANSWER_KEYS, detect, unknown_format_message
from .formats import (CONVERSATION_HINT, SCORED_FORMATS, SFT_ANSWERS, conversation_of_messages, read_pair,
                      read_sft, sft_fields)
from .records import LoadReport, PreferencePair, SFTExample, UnpairedExample
from .rows import require_mapping
from .sources import read_rows
from .unpaired import UNPAIRED_FORMATS, UNPAIRED_KEYS, detect_unpaired, read_unpaired

T = TypeVar("T")


# Formats whose tie (score gap 0) leaves no answer chosen: such a pair is dropped and counted, never trained.
UNORDERED_TIES = ("helpsteer3",)


class SourceError(DataError):
    """A problem of the whole source (unknown format, no scores), which skipping records cannot fix."""


class UnpairedData(SourceError):
    """The source holds unpaired feedback (one rated answer a record), not preference pairs."""


class SFTData(SourceError):
    """The source holds SFT data (one answer a record, unrated), not preference pairs."""


def load_pairs(source: str, *, data_format: str | None = None, split: str = "train",
               skip_bad_records: bool | None = False,
               min_score_gap: float | None = None) -> tuple[list[PreferencePair], LoadReport]:
    """Preference pairs from `source` (a path or Hub id, or `memory.InMemory` records), in file order.

    The format is `data_format`, or detected from the first readable record. With `skip_bad_records`, a
    malformed record is dropped and its message kept in `report.skipped`; otherwise it raises `DataError`.
    With `min_score_gap`, pairs whose score gap is below it are dropped, each noted in `report.skipped` too.
    `report.records` counts the records read, kept or not. Raises `DataError` if no pair is left.
    """
    pairs, report = read_pairs(source, data_format=data_format, split=split, skip_bad_records=skip_bad_records,
                               min_score_gap=min_score_gap)
    require_some(pairs, report)
    return pairs, report


def read_pairs(source: str, *, data_format: str | None = None, split: str = "train",
               skip_bad_records: bool = False,
               min_score_gap: float | None = None) -> tuple[list[PreferencePair], LoadReport]:
    """`load_pairs`, but content to return no pair at all (for `data check`, which lists why).

    Unpaired feedback (each record rates one answer) raises `UnpairedData`: there is no pair to train on."""
    if data_format is not None and data_format not in FORMAT_NAMES:
        raise DataError(f"--data-format: {data_format!r} is not a known format; use one of "
                        f"{', '.join(FORMAT_NAMES)}")
    report = LoadReport(source=str(source), format=data_format or "")
    if data_format is not None:
        _check_scored(data_format, min_score_gap, source)

    def convert(value: Any, where: str) -> PreferencePair | None:
        if not report.format:
            # A record that is not even an object is that record's fault; unknown keys are the source's.
            report.format, report.detection = detect(require_mapping(value, where))
            if not report.format:
                unpaired = detect_unpaired(value)
                if unpaired:
                    raise UnpairedData(f"{where}: this is unpaired feedback ({UNPAIRED_KEYS[unpaired]}): each "
                                       "record rates one answer, so there are no chosen/rejected pairs for DPO; "
                                       "it is data for KTO: run `preftune kto`")
                if _looks_like_sft(value) and not {"chosen", "rejected"} & set(value):
                    raise SFTData(f"{where}: this is SFT data (one answer a record, keys "
                                  f"{', '.join(map(str, value))}), with no chosen/rejected pair to prefer; "
                                  f"train it with `preftune sft`, or give preference pairs")
                raise SourceError(unknown_format_message(value, where) + _sft_hint(value))
            _check_scored(report.format, min_score_gap, source)
        pair, gap, unused = read_pair(value, report.format, where)
        report.unused_keys.update(unused)
        if gap == 0 and report.format in UNORDERED_TIES:
            report.skipped.append(f"{where}: dropped, the raters prefer neither answer (a tie: the pair has no "
                                  "chosen one)")
            return None
        if min_score_gap is not None and gap is None:
            raise DataError(f"{where}: no scores to apply --min-score-gap to (score_chosen and score_rejected, "
                            "or score_A and score_B)")
        if min_score_gap is not None and not math.isfinite(gap):  # NaN passes every comparison
            raise DataError(f"{where}: its scores are not finite numbers (their gap is {gap}), so --min-score-gap "
                            "cannot compare them; fix the scores")
        if min_score_gap is not None and gap < min_score_gap:
            report.skipped.append(f"{where}: dropped, score gap {gap:g} is below --min-score-gap {min_score_gap:g}")
            return None
        return pair

    return _collect(source, split, skip_bad_records, report, convert), report


def load_sft(source: str, *, split: str = "train",
             skip_bad_records: bool | None = False) -> tuple[list[SFTExample], LoadReport]:
    """SFT examples from `source` (each record one of the layouts of `formats.SFT_KEYS`), in file order."""
    examples, report = read_sft_source(source, split=split, skip_bad_records=skip_bad_records)
    require_some(examples, report)
    return examples, report


def read_sft_source(source: str, *, split: str = "train",
                    skip_bad_records: bool | None = False) -> tuple[list[SFTExample], LoadReport]:
    """`load_sft`, but content to return no example at all (for `data check`, which lists why)."""
    report = LoadReport(source=str(source), format="sft")

    def convert(value: Any, where: str) -> SFTExample:
        example, unused = read_sft(value, where)
        report.unused_keys.update(unused)
        return example

    return _collect(source, split, skip_bad_records, report, convert), report


class PairedData(SourceError):
    """The source holds preference pairs where unpaired feedback was expected (KTO without --paired-as-unpaired)."""


PAIRED_AS_UNPAIRED_HINT = ("pass --paired-as-unpaired to train on each pair as one desirable (chosen) and one "
                           "undesirable (rejected) example")


def load_unpaired(source: str, *, data_format: str | None = None, split: str = "train",
                  skip_bad_records: bool = False,
                  paired_as_unpaired: bool = False) -> tuple[list[UnpairedExample], LoadReport]:
    """Unpaired feedback for KTO from `source`, in file order.

    An unpaired layout (`prompt`/`completion`/`label`, or `kto_tag`) is read as it is. A file of preference pairs
    is refused with `PairedData`, unless `paired_as_unpaired`: then each pair gives two examples, its chosen
    answer desirable and its rejected answer undesirable (their `where` says which), all chosen ones first.
    Raises `DataError` if no example is left."""
    paired = data_format is not None and data_format not in UNPAIRED_FORMATS
    if not paired:
        try:
            examples, report = read_unpaired_source(source, data_format=data_format, split=split,
                                                    skip_bad_records=skip_bad_records)
        except PairedData:
            if not paired_as_unpaired:
                raise
            paired = True
    if paired:
        if not paired_as_unpaired:
            raise PairedData(f"--data-format {data_format}: is a format of preference pairs, and KTO trains on "
                             f"unpaired feedback; {PAIRED_AS_UNPAIRED_HINT}")
        pairs, report = read_pairs(source, data_format=data_format, split=split, skip_bad_records=skip_bad_records)
        # Every chosen answer, then every rejected one, as TRL's unpair_preference_dataset orders them: taken
        # pair by pair, the KL term's previous-example answer of each rejected example would be its own pair's
        # chosen answer, a matched prompt and answer where the estimate needs mismatched ones.
        examples = [UnpairedExample(p.prompt, answer, label, p.system, f"{p.where} ({name})", p.tools,
                                    p.text_fields, p.template_kwargs)
                    for name, label in (("chosen", True), ("rejected", False))
                    for p in pairs for answer in (getattr(p, name),)]
        if any(p.margin is not None for p in pairs):  # read as a pair's key, and nothing unpaired reads it
            report.unused_keys["margin"] += sum(p.margin is not None for p in pairs)
    require_some(examples, report)
    return examples, report


def read_unpaired_source(source: str, *, data_format: str | None = None, split: str = "train",
                         skip_bad_records: bool | None = False) -> tuple[list[UnpairedExample], LoadReport]:
    """Unpaired feedback examples from `source` (for `data check`); the format is detected or given. A source of
    preference pairs raises `PairedData`."""
    if data_format is not None and data_format not in UNPAIRED_FORMATS:
        raise DataError(f"--data-format: {data_format!r} is not an unpaired format; use one of "
                        f"{', '.join(UNPAIRED_FORMATS)}")
    report = LoadReport(source=source, format=data_format or "")

    def convert(value: Any, where: str) -> UnpairedExample:
        if not report.format:
            report.format = detect_unpaired(require_mapping(value, where)) or ""
            if not report.format:
                paired = detect(value)[0]
                if paired:
                    raise PairedData(f"{where}: this is a preference pair (format {paired!r}), and KTO trains on "
                                     f"unpaired feedback; {PAIRED_AS_UNPAIRED_HINT}")
                if _looks_like_sft(value) and not {"chosen", "rejected", "label", "kto_tag"} & set(value):
                    raise SFTData(f"{where}: this is SFT data (one answer a record, keys "
                                  f"{', '.join(map(str, value))}), with no rating of its answer; KTO needs each "
                                  "answer labelled desirable or not (label, or kto_tag)")
                raise SourceError(unknown_format_message(value, where, {**UNPAIRED_KEYS, **FORMAT_KEYS}))
        example, unused = read_unpaired(value, report.format, where)
        report.unused_keys.update(unused)
        return example

    return _collect(source, split, skip_bad_records, report, convert), report


def _sft_hint(value: dict) -> str:
    """For a record with no answer pair at all, what SFT data may hold (it may be SFT data of another project's
    layout); a `conversation` of role/content turns (lmsys-chat-1m, WildChat) is SFT's `messages` by another name."""
    if conversation_of_messages(value):
        return f"; for SFT, {CONVERSATION_HINT}"
    if {str(k) for k in value} & PAIR_ANSWER_KEYS:  # a preference layout's answers: not SFT data
        return ""
    return "; SFT data (`preftune sft`) holds messages, conversations, prompt/completion or question/answer fields"


def _looks_like_sft(value: dict) -> bool:
    """A record with an SFT layout's keys and no answer pair (`read_sft` would take it)."""
    return bool({"messages", "conversations", "completion", "text"} & set(value) or sft_fields(value)
                or "prompt" in value and set(SFT_ANSWERS) & set(value))


def _collect(source: str, split: str, skip_bad_records: bool | None, report: LoadReport,
             convert: Callable[[Any, str], T | None]) -> list[T]:
    """`convert` applied to every row, in order; a bad row raises, or with `skip_bad_records` is noted and dropped
    (None: the caller has no such option, and the message does not offer it)."""
    out: list[T] = []
    for where, value in read_rows(source, split=split):
        report.records += 1
        try:
            if isinstance(value, DataError):
                raise value
            item = convert(value, where)
        except DataError as exc:
            if isinstance(exc, SourceError):
                raise
            if skip_bad_records is None:
                raise DataError(f"{exc}; fix the record") from None
            if not skip_bad_records:
                raise DataError(f"{exc}; fix the record, or pass --skip-bad-records to drop such records (they "
                                f"are counted)") from None
            report.skipped.append(str(exc))
            continue
        if item is not None:
            out.append(item)
    if report.records == 0:
        raise DataError(f"{source}: no records (the file or split is empty); a data file needs at least one "
                        "record")
    return out


def require_some(items: list, report: LoadReport) -> None:
    if not items:
        raise DataError(f"{report.source}: none of the {report.records} records can be used; the first "
                        f"problem: {report.skipped[0]}")


def _check_scored(fmt: str, min_score_gap: float | None, source: str) -> None:
    if min_score_gap is not None and fmt not in SCORED_FORMATS:
        raise SourceError(f"{source}: --min-score-gap needs scores, and format {fmt!r} has none "
                        f"(formats with scores: {', '.join(SCORED_FORMATS)})")


def split_eval(items: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out `fraction` of `items` for evaluation: (train, eval), each in the original order.

    The same items, fraction and seed always give the same split. With any positive fraction at least one
    item is held out, and at least one is kept for training."""
    if not 0 <= fraction < 1:
        raise DataError(f"eval split: fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or len(items) < 2:
        return list(items), []
    n_eval = min(len(items) - 1, max(1, round(len(items) * fraction)))
    held = set(random.Random(seed).sample(range(len(items)), n_eval))
    train = [item for i, item in enumerate(items) if i not in held]
    return train, [item for i, item in enumerate(items) if i in held]
