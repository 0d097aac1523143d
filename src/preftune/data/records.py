"""The one data contract every input format is normalised into.

A turn list is `[{"role": "user"|"assistant"|"system"|"tool", "content": str}, ...]` (assistant turns may carry
`tool_calls`; see rows.py). A prompt, chosen or rejected is
either plain text or such a list (never a mix within one record: all three are text, or all three are lists).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections import Counter
from typing import Any, Union

Messages = list[dict[str, Any]]
Content = Union[str, Messages]


@dataclass
class PreferencePair:
    """One preference record. `where` says where it came from (`file.jsonl line 12`), for error messages.

    `tools` are the tool schemas the chat template is given, `template_kwargs` the record's own further arguments
    to it (`chat_template_kwargs`, as TRL reads them: Qwen3's `enable_thinking`). `text_fields` marks turns that
    the source wrote as plain text fields (orca, alpaca): with `raw_text_prompts`, or a tokenizer without a chat
    template, they are written back as that text rather than rendered as turns."""

    prompt: Content
    chosen: Content
    rejected: Content
    system: str | None = None
    where: str = ""
    tools: list[dict] | None = None
    text_fields: bool = False
    template_kwargs: dict | None = None
    margin: float | None = None  # the record's `margin`: how much more chosen is preferred (reward models use it)

    @property
    def is_chat(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class SFTExample:
    """One SFT record: a completion after an optional prompt. With no prompt, every token is trained on.
    `text_fields` marks turns that the source wrote as text fields (alpaca), as for `PreferencePair`."""

    completion: Content
    prompt: Content | None = None
    system: str | None = None
    where: str = ""
    tools: list[dict] | None = None
    text_fields: bool = False
    template_kwargs: dict | None = None

    @property
    def is_chat(self) -> bool:
        return isinstance(self.completion, list)


@dataclass
class UnpairedExample:
    """One unpaired feedback record (for KTO): a completion rated desirable (`label` True) or not.
    `text_fields` as for `PreferencePair` (an example unpaired from an orca/alpaca pair)."""

    prompt: Content
    completion: Content
    label: bool
    system: str | None = None
    where: str = ""
    tools: list[dict] | None = None
    text_fields: bool = False
    template_kwargs: dict | None = None


@dataclass
class LoadReport:
    """What reading a data source found, besides the records."""

    source: str
    format: str
    records: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per dropped bad record
    unused_keys: Counter = field(default_factory=Counter)  # key -> records holding it unread
    detection: str | None = None  # why the format was chosen, when the keys fit more than one

    def unused_line(self) -> str | None:
        """One line naming the keys no layout reader used, with how many records hold each; None if none."""
        if not self.unused_keys:
            return None
        keys = ", ".join(f"{key} ({count})" for key, count in self.unused_keys.most_common())
        return (f"{self.source}: keys not used by format {self.format!r}, ignored (records holding each): {keys}")
