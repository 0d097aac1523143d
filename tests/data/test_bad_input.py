"""Each kind of bad input is one DataError naming the file and the line or record; skipping keeps going."""

from __future__ import annotations

import json

import pytest

from preftune.data.load import load_pairs, load_sft
from preftune.errors import DataError

GOOD = {"prompt": "q", "chosen": "a", "rejected": "b"}


def _error(source, **kw) -> str:
    with pytest.raises(DataError) as err:
        load_pairs(source, **kw)
    return str(err.value)


def test_missing_file(tmp_path):
    message = _error(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl: file not found" in message


def test_malformed_json_line_names_file_line_problem_and_fix(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + '\n{"prompt": "q", "chosen": "a",\n', encoding="utf-8")
    message = _error(str(path))
    assert message.startswith(f"{path} line 2: not valid JSON (")
    assert "column" in message and "one complete JSON object" in message


@pytest.mark.parametrize("name", ["big.jsonl", "big.json"])
def test_an_integer_past_pythons_digit_limit_is_one_error(tmp_path, name):
    path = tmp_path / name
    record = json.dumps(GOOD)[:-1] + ', "id": ' + "9" * 5000 + "}"
    path.write_text(record if name.endswith("l") else f"[{record}]", encoding="utf-8")
    message = _error(str(path))
    assert "not valid JSON (Exceeds the limit (4300 digits)" in message or "not readable JSON (Exceeds" in message


def test_malformed_json_array_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"prompt": "q",\n', encoding="utf-8")
    assert _error(str(path)).startswith(f"{path} line 3: not valid JSON")


def test_wrong_shape_names_key_record_and_type(jsonl_file):
    path = jsonl_file([GOOD, {"prompt": "q", "chosen": ["a"], "rejected": "b"}])
    message = _error(path)
    assert message.startswith(f"{path} line 2: 'chosen' must be a string, got a list")


def test_missing_key(jsonl_file):
    path = jsonl_file([GOOD, {"prompt": "q", "chosen": "a", "reject": "b"}])
    message = _error(path)
    assert message.startswith(f"{path} line 2: missing key 'rejected'") and "reject" in message


def test_a_line_that_is_not_an_object(jsonl_file):
    message = _error(jsonl_file([GOOD, [1, 2]]))
    assert "line 2: expected a JSON object (a mapping of keys to values), got a list; " in message
    assert message.endswith("pass --skip-bad-records to drop such records (they are counted)")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    assert _error(str(path), skip_bad_records=True).startswith(f"{path}: no records")


def test_unknown_format_lists_formats_and_keys(jsonl_file):
    message = _error(jsonl_file([{"instruction": "x", "reply": "y"}]), skip_bad_records=True)
    assert "line 1: cannot tell the data format from the keys seen (instruction, reply)" in message
    # the formats that read one of the keys, with what they read; the others by name (the whole list with keys
    # was a line of some 2,000 characters)
    assert "read some of these keys: alpaca (instruction, optional input, chosen, rejected" in message
    assert "Other formats: text, implicit," in message and "stack_exchange, shp (README" in message
    assert "--data-format" in message and len(message) < 1100  # with the SFT hint, the temporary path included


@pytest.mark.parametrize("record", [{"instruction": "x", "output": "y"}, {"query": "x", "response": "y"},
                                    {"text": "a whole text"},
                                    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                      "content": "a"}]}])
def test_sft_data_given_for_pairs_names_preftune_sft(jsonl_file, record):
    message = _error(jsonl_file([record]), skip_bad_records=True)
    assert "line 1: this is SFT data" in message and "train it with `preftune sft`" in message
    assert "\n" not in message


def test_unknown_forced_format(jsonl_file):
    assert "not a known format; use one of text, implicit" in _error(jsonl_file([GOOD]), data_format="alpacka")


def test_non_utf8_names_line_and_byte(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    message = _error(str(path))
    assert message.startswith(f"{path} line 2: not valid UTF-8 (byte offset 15 of the line")


def test_non_utf8_csv_names_the_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"prompt,chosen,rejected\nq,a,b\ncaf\xe9,a,b\n")
    assert _error(str(path)).startswith(f"{path} line 3: not valid UTF-8")


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_empty_answer(jsonl_file, field):
    path = jsonl_file([{**GOOD, field: ""}])
    assert _error(path).startswith(f"{path} line 1: {field} answer is empty")


def test_a_key_given_twice_in_a_record_is_refused_not_halved(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps(GOOD) + '\n{"prompt": "q", "chosen": "a", "chosen": "c", "rejected": "b"}\n',
                    encoding="utf-8")
    assert _error(str(path)).startswith(f"{path} line 2: the key 'chosen' appears twice in one object (JSON "
                                        f"readers keep only the last value); keep one")
    array = tmp_path / "dup.json"
    array.write_text('[{"prompt": "q", "chosen": "a", "rejected": "b", "rejected": "c"}]', encoding="utf-8")
    assert "the key 'rejected' appears twice" in _error(str(array))


def test_gzip_bytes_read_whatever_the_name_and_a_cut_gzip_says_so(tmp_path):
    import gzip

    unnamed = tmp_path / "pairs.jsonl"
    unnamed.write_bytes(gzip.compress((json.dumps(GOOD) + "\n").encode()))
    assert load_pairs(str(unnamed))[0][0].chosen == "a"
    cut = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress((json.dumps(GOOD) + "\n") .encode() * 50)
    cut.write_bytes(whole[: len(whole) // 2])
    assert "the gzip data stops before its end (the file is incomplete)" in _error(str(cut))


def test_not_gzip(tmp_path):
    path = tmp_path / "fake.jsonl.gz"
    path.write_text("plain", encoding="utf-8")
    assert _error(str(path)).startswith(f"{path}: cannot read the file")


def test_broken_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really")
    assert _error(str(path)).startswith(f"{path}: not a readable Parquet file")


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello", encoding="utf-8")
    assert "unknown file type" in _error(str(path))


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    assert "not one saved with datasets' save_to_disk" in _error(str(tmp_path))


def test_skip_bad_records_keeps_going_and_reports_each(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD), "{oops", json.dumps({**GOOD, "chosen": 1}), json.dumps({**GOOD, "prompt": "z"})]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    pairs, report = load_pairs(str(path), skip_bad_records=True)
    assert [p.where for p in pairs] == [f"{path} line 1", f"{path} line 4"]
    assert report.records == 5 and len(report.skipped) == 3
    assert [s.split(":")[0] for s in report.skipped] == [f"{path} line {n}" for n in (2, 3, 5)]


@pytest.mark.parametrize("first", ["{oops", "[1, 2]", '"text"'])
def test_a_bad_first_line_is_skipped_before_detection(tmp_path, first):
    path = tmp_path / "first.jsonl"
    path.write_text(first + "\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    pairs, report = load_pairs(str(path), skip_bad_records=True)
    assert len(pairs) == 1 and report.format == "text" and len(report.skipped) == 1


def test_all_records_bad_is_an_error_even_when_skipping(jsonl_file):
    message = _error(jsonl_file([{**GOOD, "chosen": ""}]), skip_bad_records=True)
    assert "none of the 1 records can be used" in message and "chosen answer is empty" in message


def _ultrafeedback(gap_low: float) -> dict:
    turn = [{"role": "user", "content": "q"}]
    return {"prompt": "q", "chosen": turn + [{"role": "assistant", "content": "a"}],
            "rejected": turn + [{"role": "assistant", "content": "b"}], "score_chosen": 5.0,
            "score_rejected": 5.0 - gap_low}


def test_min_score_gap_drops_and_counts(jsonl_file):
    path = jsonl_file([_ultrafeedback(2), _ultrafeedback(0.5), _ultrafeedback(1)])
    pairs, report = load_pairs(path, min_score_gap=1.0)
    assert [p.where for p in pairs] == [f"{path} line 1", f"{path} line 3"]
    assert report.skipped == [f"{path} line 2: dropped, score gap 0.5 is below --min-score-gap 1"]


def test_min_score_gap_needs_scores(jsonl_file):
    assert "--min-score-gap needs scores" in _error(jsonl_file([GOOD]), min_score_gap=1.0, skip_bad_records=True)
    unscored = {k: v for k, v in _ultrafeedback(1).items() if not k.startswith("score")}
    assert "line 1: no scores" in _error(jsonl_file([unscored]), min_score_gap=1.0)


def test_sft_errors_name_the_line(jsonl_file):
    path = jsonl_file([{"text": "ok"}, {"txt": "typo"}])
    with pytest.raises(DataError, match=r"line 2: cannot read an SFT example from the keys seen \(txt\)"):
        load_sft(path)
    examples, report = load_sft(path, skip_bad_records=True)
    assert len(examples) == 1 and len(report.skipped) == 1
