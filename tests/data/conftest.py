"""Helpers shared by the data tests: write small data files into a test's tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def jsonl_file(tmp_path: Path):
    """jsonl_file(rows, name="data.jsonl") -> path of a JSON Lines file holding `rows`."""

    def write(rows: list, name: str = "data.jsonl") -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return str(path)

    return write
