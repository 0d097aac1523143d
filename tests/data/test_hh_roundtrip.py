"""The real HH-RLHF test split: every record, normalised and written back, is its original string."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from preftune.data.fields import hh_transcript
from preftune.data.load import load_pairs

NAME = "hh-rlhf-harmless-base-test.jsonl.gz"
# The shared data folder sits beside the project checkout: ../shared/data.
_PATH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / NAME
HH = _PATH if _PATH.is_file() else None

pytestmark = pytest.mark.skipif(HH is None, reason=f"{NAME} not found beside the project")


def test_every_record_round_trips_exactly():
    with gzip.open(HH, "rt", encoding="utf-8") as handle:
        originals = [json.loads(line) for line in handle]
    pairs, report = load_pairs(str(HH))
    assert report.format == "hh" and report.skipped == []
    assert len(pairs) == len(originals) == 2312
    for pair, original in zip(pairs, originals):
        assert hh_transcript(pair.prompt + pair.chosen, pair.system) == original["chosen"], pair.where
        assert hh_transcript(pair.prompt + pair.rejected, pair.system) == original["rejected"], pair.where
        # The prompt is what both share, ending on the user turn the answers reply to.
        assert pair.prompt[-1]["role"] == "user"
        assert pair.chosen[0]["role"] == pair.rejected[0]["role"] == "assistant"
