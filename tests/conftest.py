"""Session fixtures; the helpers they use live in tinylm.py so test modules can import them by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinylm import make_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def sharing_is_cheap(monkeypatch):
    """Forward calls cost nothing, so the planner always prefers computing each prompt once (the shared layout):
    for tests of the shared layout's exactness on batches too small for sharing to pay on a CPU."""
    from preftune.logps import planner

    monkeypatch.setitem(planner.CALL_COST_TOKENS, "cpu", 0)
