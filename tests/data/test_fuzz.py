"""Whatever a data file holds, loading gives pairs or a DataError: never a KeyError, TypeError, ..."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.data.detect import FORMAT_NAMES, detect_format
from preftune.data.formats import to_pair, to_sft
from preftune.data.load import load_pairs, load_sft, read_unpaired_source
from preftune.data.unpaired import UNPAIRED_FORMATS, read_unpaired
from preftune.errors import DataError
from .test_formats import EXAMPLES  # a valid record of every format, to damage


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)
KEYS = ["prompt", "chosen", "rejected", "system", "question", "input", "conversations", "response_j",
        "response_k", "history", "human_ref_A", "human_ref_B", "labels", "score_chosen", "score_rejected",
        "score_A", "score_B", "messages", "completion", "text", "role", "content", "from", "value",
        "instruction", "output", "response_chosen", "response_rejected", "tools", "tool_calls", "label", "kto_tag",
        "name", "arguments", "function"]
# Values shaped almost like the real thing, where the bugs hide: messages with a wrong part, transcripts.
messages = st.lists(st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "assistant", "system", "tool"]) | scalars,
    "content": st.text(max_size=10) | json_values,
    "tool_calls": json_values | st.lists(st.fixed_dictionaries({}, optional={
        "function": st.fixed_dictionaries({}, optional={"name": st.text(max_size=5) | scalars,
                                                        "arguments": st.text(max_size=10) | json_values}),
        "name": st.text(max_size=5), "arguments": json_values}), max_size=2),
    "from": st.sampled_from(["human", "gpt", "system", "alien", "function_call", "observation"]) | scalars,
    "value": st.text(max_size=10) | json_values | st.just('{"name": "f", "arguments": "{"}')}), max_size=4)
transcripts = st.lists(st.sampled_from(["\n\nHuman: ", "\n\nAssistant: ", "hi", " ", "\n", "Human:"]),
                       max_size=8).map("".join)
history = st.lists(st.lists(st.text(max_size=5) | scalars, max_size=3) | scalars, max_size=3)
near_values = json_values | messages | transcripts | st.text(max_size=10) | history
random_records = st.dictionaries(st.sampled_from(KEYS), near_values, max_size=8)


@st.composite
def damaged_records(draw) -> dict:
    """A valid record with a few keys dropped, replaced, or their messages' parts damaged."""
    record = json.loads(json.dumps(draw(st.sampled_from(EXAMPLES))[1]))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(record) + KEYS))
        action = draw(st.sampled_from(["drop", "replace", "damage"]))
        if action == "drop":
            record.pop(key, None)
        elif action == "replace" or not isinstance(record.get(key), list) or not record[key]:
            record[key] = draw(near_values)
        else:
            turns = record[key]
            turns[draw(st.integers(0, len(turns) - 1))] = draw(near_values | messages.map(lambda m: m[:1]))
    return record


records = damaged_records() | random_records


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _only_data_errors(call, *args, **kw):
    try:
        call(*args, **kw)
    except DataError:
        pass


@FUZZ
@given(record=records, fmt=st.sampled_from((None,) + FORMAT_NAMES))
def test_any_record_in_any_format(record, fmt):
    fmt = fmt or detect_format(record)
    if fmt is not None:
        _only_data_errors(to_pair, record, fmt, "w")
    _only_data_errors(to_sft, record, "w")
    for unpaired in UNPAIRED_FORMATS:
        _only_data_errors(read_unpaired, record, unpaired, "w")


@FUZZ
@given(lines=st.lists(records | json_values, min_size=1, max_size=5), skip=st.booleans(),
       gap=st.none() | st.floats(allow_nan=False))
def test_any_jsonl_file(folder, lines, skip, gap):
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    _only_data_errors(load_pairs, str(path), skip_bad_records=skip, min_score_gap=gap)
    _only_data_errors(load_sft, str(path), skip_bad_records=skip)
    _only_data_errors(read_unpaired_source, str(path), skip_bad_records=skip)


@FUZZ
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz"]),
       skip=st.booleans())
def test_any_bytes_in_any_file_kind(folder, data, suffix, skip):
    path = folder / f"raw{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    _only_data_errors(load_pairs, str(path), skip_bad_records=skip)


@FUZZ
@given(record=records, noise=st.binary(max_size=20), cut=st.integers(0, 200))
def test_damaged_json_lines(folder, record, noise, cut):
    line = json.dumps(record).encode()
    path = folder / "damaged.jsonl"
    path.write_bytes(line[:cut] + noise + b"\n" + line + b"\n")
    _only_data_errors(load_pairs, str(path), skip_bad_records=True)
