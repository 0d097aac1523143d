"""Records held in memory: a list of dicts, a `datasets.Dataset` (or one split of a `DatasetDict`).

They go through the same detection, normalisation and reporting as a file; `where` in messages is
"NAME record N" (1-based), NAME being what the caller calls the source (`data`, `eval_data`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator

from ..errors import DataError


class InMemory:
    """Records held in memory, and the name messages give them. `str()` is the name."""

    def __init__(self, records: Any, name: str = "data"):
        self.records = records
        self.name = name

    def __str__(self) -> str:
        return self.name

    def __len__(self) -> int:
        return len(self.records)

    def label(self) -> str:
        """How a config names these records: `<in-memory data: 120 records>` (a DatasetDict by its splits)."""
        kind = type(self.records).__name__
        if kind == "DatasetDict":
            return f"<in-memory {self.name}: DatasetDict, splits {', '.join(self.records)}>"
        return f"<in-memory {self.name}: {len(self)} records>" if hasattr(self.records, "__len__") else f"<{self.name}>"


def is_path(source: Any) -> bool:
    """A file, folder or Hub id (read from disk or the Hub), as opposed to records in memory."""
    return isinstance(source, (str, os.PathLike))


def as_source(source: Any, name: str = "data"):
    """`source` as `read_rows` takes it: a path or id as a string, anything else wrapped as `InMemory`."""
    if isinstance(source, InMemory):
        return source
    if is_path(source):
        return os.fspath(source)
    return InMemory(_record_list(source, name), name)


def _record_list(records: Any, name: str):
    """The records themselves, or a `DataError` that says what was passed and what is accepted."""
    datasets = sys.modules.get("datasets")  # a Dataset object means the package is already imported
    if datasets is not None and isinstance(records, datasets.DatasetDict):
        return records  # the split is chosen when it is read, as for a saved folder
    if datasets is not None and isinstance(records, (datasets.Dataset, datasets.IterableDataset)):
        return records
    if isinstance(records, (list, tuple)):
        return records
    hint = ""
    if isinstance(records, dict):
        hint = "; a dict is one record: pass a list of them"
    elif hasattr(records, "to_dict"):
        hint = "; for a DataFrame pass df.to_dict('records')"
    raise DataError(f"{name}: expected a list of records (dicts), a datasets.Dataset, or a path / Hub id; got "
                    f"{type(records).__name__}{hint}")


def memory_rows(source: InMemory, split: str = "train") -> Iterator[tuple[str, Any]]:
    """`(where, record)` for each record, as `read_rows` yields them for a file."""
    records = source.records
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(records, datasets.DatasetDict):
        if split not in records:
            raise DataError(f"{source}: no split {split!r}; the splits are {', '.join(records)} (pass split=...)")
        records = records[split]
    for number, record in enumerate(records, start=1):
        yield f"{source} record {number}", record
