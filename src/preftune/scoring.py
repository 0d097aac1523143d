"""`preftune score`: a reward model's reward of every answer in a data file, and for pairs whether it agrees
with the label (a data-cleaning tool: pairs it confidently disagrees with are the ones to read first)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.load import SourceError, UnpairedData, load_pairs, load_sft, read_unpaired_source
from .data.records import SFTExample
from .data.tokenize import tokenize_all
from .data.unpaired import UNPAIRED_FORMATS
from .errors import DataError, PreftuneError
from .reward import rewards_table
from .models.narrow import require_items_fit


@dataclass
class ScoreReport:
    """What `preftune.score` returns: `summary`, what `preftune score` prints, and `rows`, what it writes with
    --output (one dict a pair, or one an answer)."""

    summary: dict
    rows: list[dict]


def _read(source, data_format: str | None, split: str):
    """(records, load report, "pairs" | "answers"): pairs when the source holds them, else single answers
    (unpaired feedback with a label, or prompt/completion and conversations without one)."""
    if data_format in UNPAIRED_FORMATS:
        return (*read_unpaired_source(source, data_format=data_format, split=split, skip_bad_records=None), "answers")
    try:
        return (*load_pairs(source, data_format=data_format, split=split, skip_bad_records=None), "pairs")
    except UnpairedData:
        return (*read_unpaired_source(source, split=split, skip_bad_records=None), "answers")
    except SourceError as not_pairs:
        if data_format is not None:
            raise
        try:
            return (*load_sft(source, split=split, skip_bad_records=None), "answers")
        except DataError:
            raise not_pairs from None


def score_records(model, tokenizer, source, *, device, batch_size: int = 8, max_length: int = 1024,
                  max_prompt_length: int | None = None, data_format: str | None = None, split: str = "train",
                  limit: int | None = None) -> ScoreReport:
    """Rewards of the pairs or answers in `source` (a path, Hub id or `data.memory.InMemory`) under `model`."""
    records, report, kind = _read(source, data_format, split)
    if limit:
        records = records[:limit]
    if kind == "answers":
        labels = [getattr(r, "label", None) for r in records]
        records = [r if isinstance(r, SFTExample) else SFTExample(r.completion, r.prompt or None, r.system, r.where,
                                                                   r.tools, template_kwargs=r.template_kwargs)
                   for r in records]
    items, stats = tokenize_all(tokenizer, records, max_length=max_length, max_prompt_length=max_prompt_length)
    if not items:
        raise PreftuneError(f"{report.source}: no record fits in --max-length {max_length}")
    require_items_fit(model, items, f"model {getattr(model, 'name_or_path', '') or type(model).__name__}")
    table = rewards_table(model, items, pad_id=tokenizer.pad_token_id, device=device, batch_size=batch_size)
    common = {"format": report.format, "dropped": stats.dropped, "truncated": stats.truncated}
    if report.unused_keys:
        common["unused_keys"] = dict(report.unused_keys)
    if kind == "pairs":
        return _pair_report(table, items, records, common)
    return _answer_report(table, items, records, labels, common)


def _pair_report(table: torch.Tensor, items, records, common: dict) -> ScoreReport:
    chosen, rejected = table[:, 0], table[:, 1]
    diff = chosen - rejected
    rows = []
    # One read of the device tensors, not three per row.
    for item, c, r, d in zip(items, chosen.tolist(), rejected.tolist(), diff.tolist()):
        record = records[item.index]
        row = {"index": item.index, "where": record.where, "chosen_reward": c, "rejected_reward": r,
               "reward_margin": d, "agrees": d > 0}
        if record.margin is not None:
            row["margin"] = record.margin
        rows.append(row)
    summary = {"pairs": len(items), "agreement": sum(row["agrees"] for row in rows) / len(rows) if rows else 0.0, "mean_margin": float(diff.mean()),
               "chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean()), **common}
    return ScoreReport(summary, rows)


def _answer_report(table: torch.Tensor, items, records, labels: list, common: dict) -> ScoreReport:
    rewards = table[:, 0]
    rows = []
    for item, reward in zip(items, rewards.tolist()):
        row = {"index": item.index, "where": records[item.index].where, "reward": reward}
        if labels[item.index] is not None:
            row["label"] = labels[item.index]
        rows.append(row)
    summary = {"answers": len(items), "mean_reward": float(rewards.mean())}
    for name, wanted in (("desirable", True), ("undesirable", False)):
        picked = [float(rewards[i]) for i, item in enumerate(items) if labels[item.index] is wanted]
        if picked:
            summary[f"{name}_answers"] = len(picked)
            summary[f"{name}_mean_reward"] = sum(picked) / len(picked)
    return ScoreReport({**summary, **common}, rows)
