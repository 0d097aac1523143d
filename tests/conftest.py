"""Session fixtures; the helpers they use live in tinylm.py so test modules can import them by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tinylm import make_model_dir


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory):
    """Caches (tokenised data, reference log-probs) go to a folder of this session, not the user's home; the CLI
    runs of the e2e tests inherit it through the environment."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def sharing_is_cheap(monkeypatch):
    """Forward calls cost nothing, so the planner always prefers computing each prompt once (the shared layout):
    for tests of the shared layout's exactness on batches too small for sharing to pay on a CPU."""
    from preftune.logps import planner

    monkeypatch.setitem(planner.CALL_COST_TOKENS, "cpu", 0)


@pytest.fixture
def padded_layouts(monkeypatch):
    """No packed layout: for tests of the padded layouts (shared and plain) and of the planner between them."""
    from preftune.logps import answer

    monkeypatch.setattr(answer, "packs", lambda model: False)
