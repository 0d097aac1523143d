"""The README's configuration reference lists every config field, so the docs cannot fall behind the code."""

from dataclasses import fields
from pathlib import Path

from preftune.config import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_config_field_is_documented():
    text = README.read_text()
    missing = [f.name for f in fields(TrainConfig) if f"| `{f.name}` |" not in text]
    assert not missing, f"README config reference lacks {missing}"
