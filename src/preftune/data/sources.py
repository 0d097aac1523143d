"""Read raw records from a file, a saved `datasets` folder or a Hugging Face dataset id.

`read_rows` yields `(where, value)`: `where` is "FILE line N" for JSON Lines and "FILE record N" otherwise
(1-based), for error messages. A line that cannot be read arrives as the `DataError` describing it, in place of
its value, so the caller decides whether to stop or to skip it; a file that cannot be read at all raises.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import re
import sys
import tokenize
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError
from .encode import say_once
from .memory import InMemory, memory_rows

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
# Lists in a JSON object that may hold the records, tried in this order when the object holds several lists.
_JSON_LIST_KEYS = ("data", "train", "rows", "records", "examples")

NEWLINE = b"\n"
Rows = Iterator[tuple[str, Any]]


def read_rows(source, *, split: str = "train") -> Rows:
    """`source`: a path or Hub id, or records in memory (`memory.InMemory`)."""
    if isinstance(source, InMemory):
        return memory_rows(source, split)
    path = Path(source).expanduser()
    if path.is_dir():
        return _saved_dataset(path, split)
    if path.is_file():
        return _file_rows(path)
    if _looks_like_path(source):
        raise DataError(f"{source}: file not found; check the path (a Hugging Face dataset id has the form "
                        "owner/name and no file extension)")
    return _hub_dataset(source, split)


def _looks_like_path(source: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else that does not exist is a mistyped path, and so is
    `owner/name` when `owner` is a folder here (`data/pairs` for `data/pairs.jsonl`: the Hub would be asked, with
    retries, for most of a minute)."""
    return (source.lower().endswith(SUFFIXES + (".gz",)) or source.startswith(("/", ".", "~", "\\"))
            or source.count("/") > 1 or ("/" in source and Path(source.split("/", 1)[0]).is_dir()))


def _file_rows(path: Path) -> Rows:
    name = path.name.lower()
    compressed = name.endswith(".gz")
    kind = next((s for s in SUFFIXES if name.removesuffix(".gz").endswith(s)), None)
    if kind is None:
        raise DataError(f"{path}: unknown file type; use one of {', '.join(SUFFIXES)} (optionally .gz), "
                        "a folder saved with datasets' save_to_disk, or a Hugging Face dataset id")
    data = _read_bytes(path, compressed)
    if kind == ".jsonl":
        return _jsonl_rows(path, data)
    if kind == ".parquet":
        return _numbered(path, _parquet_records(path, data))
    text = _decode(path, data)
    if kind in (".csv", ".tsv"):
        return _numbered(path, _csv_records(path, text, "," if kind == ".csv" else "\t"))
    return _json_rows(path, text)


GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path, compressed: bool) -> bytes:
    """The file's bytes, unzipped when it is named .gz or its bytes are gzip's (a gzipped file saved without
    the suffix reads as what it holds)."""
    try:
        data = path.read_bytes()
        if compressed or data[:2] == GZIP_MAGIC:
            return gzip.decompress(data)
        return data
    except EOFError:
        raise DataError(f"{path}: the gzip data stops before its end (the file is incomplete); copy or download "
                        f"it again") from None
    except (OSError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read the file ({exc}); if it ends in .gz it must be gzip-compressed") \
            from None


def _decode(path: Path, data: bytes, line: int | None = None) -> str:
    try:
        return data.decode("utf-8-sig" if line in (None, 1) else "utf-8")
    except UnicodeDecodeError as exc:
        at = f"line {line if line is not None else data.count(NEWLINE, 0, exc.start) + 1}"
        raise DataError(f"{path} {at}: not valid UTF-8 (byte offset {exc.start} of the "
                        f"{'line' if line is not None else 'file'}: {exc.reason}); re-save the file as UTF-8") \
            from None


class _RepeatedKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _object(pairs: list) -> dict:
    """A JSON object whose keys are all different: Python's json would keep a repeated key's last value and
    drop the others without a word (a record with "chosen" twice would lose one answer)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _repeated(where: str, key: str) -> DataError:
    return DataError(f"{where}: the key {key!r} appears twice in one object (JSON readers keep only the last "
                     f"value); keep one")


def _jsonl_rows(path: Path, data: bytes) -> Rows:
    first = True
    for number, raw in enumerate(data.split(NEWLINE), start=1):
        where = f"{path} line {number}"
        if not raw.strip():
            continue  # blank lines, such as a final newline, hold no record
        if first and (raw.strip() in (b"[", b"{") or _records_array(raw)):
            raise DataError(f"{where}: starts with {raw.strip()[:1].decode()!r}: this looks like one JSON document, "
                            "not JSON Lines (one whole object on each line); name the file .json")
        first = False
        try:
            yield where, json.loads(_decode(path, raw, number), object_pairs_hook=_object)
        except DataError as exc:
            yield where, exc
        except _RepeatedKey as exc:
            yield where, _repeated(where, exc.key)
        except (ValueError, RecursionError) as exc:  # ValueError: also an integer of over 4,300 digits
            yield where, DataError(f"{where}: not valid JSON ({_json_problem(exc)}); each line must hold one "
                                   "complete JSON object, with newlines inside strings written as \\n")


def _records_array(raw: bytes) -> bool:
    """Whether a line holds a whole array of records (a .json file's content on one line)."""
    if not raw.lstrip().startswith(b"[{"):
        return False
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return (isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
            and not all(any(k <= v.keys() for k in _MESSAGE_KEYS) for v in value))  # a message list is one record's


def _json_problem(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, ValueError):
        return str(exc).split(";")[0]
    return "nested too deeply"


def _json_rows(path: Path, text: str) -> Rows:
    try:
        value = json.loads(text, object_pairs_hook=_object)
    except _RepeatedKey as exc:
        raise _repeated(str(path), exc.key) from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one value a line: JSON Lines saved as .json
            return _jsonl_rows(path, text.encode("utf-8"))
        raise DataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); the file "
                        "must hold one JSON array of records, or an object holding one such list") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not readable JSON ({_json_problem(exc)})") from None
    return _numbered(path, _json_records(path, value))


_AS_RECORDS = "save the records instead: df.to_json(path, orient='records', lines=True), named .jsonl"


def _json_records(path: Path, value: Any) -> list:
    if isinstance(value, list):
        if value and all(isinstance(item, list) for item in value):
            raise DataError(f"{path}: the rows are lists without key names (as pandas' to_json(orient='values') "
                            f"writes them); {_AS_RECORDS}")
        return value
    if isinstance(value, dict):
        if {"columns", "data"} <= value.keys() and isinstance(value["data"], list) and value["data"] \
                and all(isinstance(row, list) for row in value["data"]):
            raise DataError(f"{path}: column names apart from rows of values (as pandas' to_json(orient='split') "
                            f"writes them); {_AS_RECORDS}")
        if value and all(key.isdigit() and isinstance(item, dict) for key, item in value.items()):
            raise DataError(f"{path}: one object per row keyed by row number (as pandas' to_json(orient='index') "
                            f"writes them); {_AS_RECORDS}")
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) == 1:
            return value[lists[0]]
        for key in _JSON_LIST_KEYS:
            if key in lists:
                return value[key]
        if _pandas_columns(value):
            raise DataError(f"{path}: one object per column keyed by row number, as pandas' to_json() writes by "
                            f"default; {_AS_RECORDS}")
        if not lists:
            return [value]  # a single record
        raise DataError(f"{path}: the JSON object holds several lists ({', '.join(lists)}) and none is called "
                        f"{' or '.join(_JSON_LIST_KEYS)}; keep only the list of records")
    raise DataError(f"{path}: expected a JSON array of records, got {type(value).__name__}")


def _pandas_columns(value: dict) -> bool:
    columns = list(value.values())
    return bool(columns) and all(isinstance(c, dict) and c and all(k.isdigit() for k in c) for c in columns)


def _refuse_unclosed_quote(path: Path, text: str, delimiter: str) -> None:
    """A quoted field that is never closed takes the rest of the file into one cell, every later record with it;
    the usual reading says nothing of it (a record would then lack its answers, far from the cause)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1
    try:
        for _ in reader:
            start = reader.line_num + 1
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise DataError(f"{path} line {start}: a quoted field opened there is never closed, so the rest of the "
                            "file would be one cell; close the quote (a quote inside a quoted field is written "
                            "twice)") from None


def _csv_records(path: Path, text: str, delimiter: str = ",") -> list[dict]:
    """The rows of a CSV (or tab-separated) file; cells holding message lists written as text are read as the
    lists (said once)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long answers exceed the 128 KiB default
    _refuse_unclosed_quote(path, text, delimiter)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        records = list(reader)
    except csv.Error as exc:
        raise DataError(f"{path}: not readable CSV ({exc}); save it with a header row and quoted fields") \
            from None
    header = reader.fieldnames or []
    other = next((d for d in ";\t|," if d != delimiter and len(header) == 1 and d in header[0]), None)
    if other is not None:
        raise DataError(f"{path}: the header is one column, {header[0][:60]!r}: the fields are separated by "
                        f"{other!r}, not {delimiter!r}; save it with {delimiter!r} between fields"
                        + {"\t": " (or name it .tsv)", ",": " (or name it .csv)"}.get(other, ""))
    listed: set[str] = set()
    for number, record in enumerate(records, start=1):
        for key, cell in record.items():
            try:
                value = _written_list(key, cell) if isinstance(cell, str) else None
            except ValueError as exc:
                raise DataError(f"{path} record {number}: the {key} cell looks like a message list written as "
                                f"text, but it does not read back as one ({exc}); save the data as JSON Lines "
                                "(Dataset.to_json) or Parquet instead of CSV") from None
            if value is not None:
                record[key] = value
                listed.add(str(key))
    note = f"{path}: the cells of {', '.join(sorted(listed))} hold lists written as text (as pandas' to_csv " \
           "writes them); they are read as the lists"
    if listed:  # once, though `data check` may read a file twice (as pairs, then as SFT)
        say_once(note, note)
    return records


_MESSAGE_KEYS = ({"role", "content"}, {"from", "value"})
_OBJECT_KEYS = ("tools", "chat_template_kwargs")  # columns of objects, which pandas writes as Python literals too


def _written_list(key: str, cell: str) -> Any:
    """A message list (or an alpaca `history` of [user, assistant] pairs, or the objects of a `tools` or
    `chat_template_kwargs` column) written into a CSV cell as JSON, as a Python literal or as numpy prints an
    array of dicts, read back; None for any other cell (an answer that is itself a JSON array stays text)."""
    text = cell.strip()
    if (text[:1], text[-1:]) not in (("[", "]"), ("{", "}")):
        if _MESSAGES_START.match(text) and _left_open(text):  # cut off (a spreadsheet's cell limit): not text
            raise ValueError(f"it starts {text[:40]!r} and its brackets are left open")
        return None
    for parse in (json.loads, ast.literal_eval, _numpy_printed):  # literals only: no code runs
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        items = value if isinstance(value, list) else [value]
        messages = all(isinstance(m, dict) and any(k <= m.keys() for k in _MESSAGE_KEYS) for m in items)
        history = key == "history" and all(isinstance(t, list) and all(isinstance(x, str) for x in t)
                                           for t in items)
        objects = key in _OBJECT_KEYS and all(isinstance(m, dict) for m in items)  # tool schemas, template args
        return value if items and (messages or history or objects) or (key == "history" and value == []) else None
    if _MESSAGES_START.match(text):  # a message list that did not survive being written: not an answer's text
        raise ValueError(f"it starts {text[:40]!r}")
    return None


def _left_open(text: str) -> bool:
    """Whether `text`, read as Python tokens, ends inside a bracket (or a string): a list cut off. A whole list
    followed by words (an answer that quotes one) is not."""
    depth = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.OP and token.string in "([{":
                depth += 1
            elif token.type == tokenize.OP and token.string in ")]}":
                depth -= 1
    except (tokenize.TokenError, SyntaxError):
        return True
    return depth > 0


# The start of a list of messages, first key role, content, from or value, quoted as JSON or as Python does.
_MESSAGES_START = re.compile(r"""\[\s*\{\s*(['"])(role|content|from|value)\1\s*:""")


def _numpy_printed(text: str) -> Any:
    """A cell as `str()` of a numpy object array writes it (`Dataset.to_pandas().to_csv()` does, for a column of
    message lists): `[{...}\n {...}]`, no comma between elements, nested lists as `array([...], dtype=object)`.
    Read as Python tokens, so brackets and quotes inside the strings are left alone: a comma goes back between two
    elements of a list, and each `array(...)` becomes its list."""
    skip = (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT)
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in skip]
    except (tokenize.TokenError, SyntaxError) as exc:
        raise ValueError(str(exc)) from None
    out: list[str] = []
    stack: list[str] = []  # open brackets, and "array" for the parenthesis of an array(...) call
    ended = False  # the last token written ends an element
    i = 0
    while i < len(tokens):
        tok, after = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else None
        word = tok.string if tok.type == tokenize.OP else None
        if tok.type == tokenize.NAME and tok.string == "array" and after is not None and after.string == "(":
            if ended and stack[-1:] == ["["]:
                out.append(",")
            stack.append("array")
            i, ended = i + 2, False
            continue
        if stack[-1:] == ["array"] and (word == ")" or (word == "," and after is not None
                                                          and after.string == "dtype")):
            while tokens[i].string != ")":  # the dtype argument, up to the call's closing parenthesis
                i += 1
            stack.pop()
            i, ended = i + 1, True
            continue
        starts = tok.type in (tokenize.STRING, tokenize.NUMBER, tokenize.NAME) or word in ("[", "{", "(", "-")
        if starts and ended and stack[-1:] == ["["]:
            out.append(",")
        out.append(tok.string)
        if word in ("[", "{", "("):
            stack.append(word)
        elif word in ("]", "}", ")") and stack:
            stack.pop()
        ended = tok.type in (tokenize.STRING, tokenize.NUMBER, tokenize.NAME) or word in ("]", "}", ")")
        i += 1
    return ast.literal_eval(" ".join(out))


def _parquet_records(path: Path, data: bytes) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # In memory arrow owns: a reader over Python's bytes lets its worker threads release them after the read,
    # and one that does so while the interpreter exits aborts the process (exit code 134 after a finished run).
    buffer = pa.allocate_buffer(len(data))
    memoryview(buffer).cast("B")[:] = data
    try:
        return pq.read_table(pa.BufferReader(buffer)).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def _numbered(path: Path, records: list) -> Rows:
    for number, record in enumerate(records, start=1):
        yield f"{path} record {number}", record


def _saved_dataset(path: Path, split: str) -> Rows:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: a folder, but not one saved with datasets' save_to_disk ({exc}); pass a data "
                        "file instead") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; the splits are {', '.join(loaded)} (pass --split)")
        loaded = loaded[split]
    return _numbered(path, loaded)


def _hub_dataset(name: str, split: str) -> Rows:
    import datasets

    head = f"{name}: not a local file or folder, and loading it as a Hugging Face dataset (split {split!r})"
    offline = _hub_unreachable(name, head)
    try:
        with _offline(offline is not None):  # the Hub did not answer: its local cache only, without retries
            loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the Hub raises many kinds; any of them means this source cannot be used
        if offline is not None:
            raise DataError(f"{head} failed: the Hub could not be reached ({offline}) and no copy is cached") \
                from None
        raise DataError(f"{head} failed: {type(exc).__name__}: {exc}") from None
    return _numbered(Path(name), loaded)


def _hub_unreachable(name: str, head: str) -> str | None:
    """Why the Hub did not answer one request for dataset `name` (None when it did, or when offline mode is set
    and only the cache is read anyway). Without it, a machine without network retries for half a minute.
    A dataset the Hub says does not exist, or is gated, is refused here."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    if constants.is_offline_mode():
        return None
    try:
        HfApi().dataset_info(name, timeout=10)
    except GatedRepoError:
        raise DataError(f"{name}: a gated Hub dataset; accept its terms on huggingface.co and log in "
                        "(hf auth login)") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise DataError(f"{head} failed: no file or folder here of that name, and no Hub dataset either (if it "
                        "is private, log in with hf auth login)") from None
    except Exception as exc:  # connection refused, DNS, timeouts, proxies: whatever the HTTP stack raises
        return (str(exc).splitlines() or [type(exc).__name__])[0]
    return None


@contextmanager
def _offline(on: bool):
    """Hub access switched off for what runs inside (datasets reads its cache instead), when `on`."""
    if not on:
        yield
        return
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, getattr(datasets.config, "HF_HUB_OFFLINE", False)
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
