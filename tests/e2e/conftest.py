"""Fixtures of the end-to-end tests: a folder with a tiny model and data, as a user's working directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinylm import fact_pairs, make_model_dir, write_jsonl


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny random model in `base/`, 32 fact pairs in `pairs.jsonl`, and their chosen answers as SFT data."""
    d = tmp_path_factory.mktemp("e2e")
    make_model_dir(d / "base")
    pairs = fact_pairs(32)
    write_jsonl(d / "pairs.jsonl", pairs)
    write_jsonl(d / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs])
    return d
