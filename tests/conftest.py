"""Session fixtures; the helpers they use live in tinylm.py so test modules can import them by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinylm import make_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-model"))
