"""The one data contract every input format is normalised into.

A turn list is `[{"role": "user"|"assistant"|"system", "content": str}, ...]`. A prompt, chosen or rejected is
either plain text or such a list (never a mix within one record: all three are text, or all three are lists).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

Messages = list[dict[str, str]]
Content = Union[str, Messages]


@dataclass
class PreferencePair:
    """One preference record. `where` says where it came from (`file.jsonl line 12`), for error messages."""

    prompt: Content
    chosen: Content
    rejected: Content
    system: str | None = None
    where: str = ""

    @property
    def is_chat(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class SFTExample:
    """One SFT record: a completion after an optional prompt. With no prompt, every token is trained on."""

    completion: Content
    prompt: Content | None = None
    system: str | None = None
    where: str = ""

    @property
    def is_chat(self) -> bool:
        return isinstance(self.completion, list)


@dataclass
class LoadReport:
    """What reading a data source found, besides the records."""

    source: str
    format: str
    records: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per dropped bad record
