"""Every file kind the loader reads, the place each row names, and the held-out split."""

from __future__ import annotations

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preftune.data.load import load_pairs, load_sft, split_eval
from preftune.data.sources import read_rows

ROWS = [{"prompt": "q1", "chosen": "a1", "rejected": "b1"}, {"prompt": "q2", "chosen": "a2", "rejected": "b2"}]


def _write_json(path, value):
    path.write_text(json.dumps(value), encoding="utf-8")


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _gzip(path):
    target = path.with_name(path.name + ".gz")
    target.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return target


WRITERS = {
    "data.jsonl": lambda path: path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8"),
    "data.json": lambda path: _write_json(path, ROWS),
    "wrapped.json": lambda path: _write_json(path, {"version": 2, "data": ROWS}),
    "lines.json": lambda path: path.write_text("\n".join(json.dumps(r) for r in ROWS), encoding="utf-8"),
    "data.parquet": lambda path: pq.write_table(pa.Table.from_pylist(ROWS), path),
    "data.csv": lambda path: _write_csv(path, ROWS),
}


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", list(WRITERS))
def test_every_file_kind_reads_the_same_pairs(tmp_path, name, compressed):
    path = tmp_path / name
    WRITERS[name](path)
    if compressed:
        path = _gzip(path)
    pairs, report = load_pairs(str(path))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("q1", "a1", "b1"), ("q2", "a2", "b2")]
    assert (report.format, report.records, report.skipped) == ("text", 2, [])
    unit = "line" if name in ("data.jsonl", "lines.json") else "record"  # JSON Lines count lines
    assert pairs[1].where == f"{path} {unit} 2"


def test_jsonl_lines_are_counted_in_the_file_with_blank_lines(jsonl_file, tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert [where for where, _ in read_rows(str(path))] == [f"{path} line 2", f"{path} line 4"]


def test_a_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode())
    assert load_pairs(str(path))[0][0].chosen == "a1"


def test_a_saved_dataset_folder_and_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(folder))
    assert len(load_pairs(str(folder))[0]) == 2
    pairs, _ = load_pairs(str(folder), split="test")
    assert len(pairs) == 1 and pairs[0].where == f"{folder} record 1"


def test_chat_records_from_parquet(tmp_path):
    rows = [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    pair = load_pairs(str(path))[0][0]
    assert pair.prompt == [{"role": "user", "content": "q"}] and pair.rejected[0]["content"] == "b"


def test_sft_records_from_a_file(jsonl_file):
    path = jsonl_file([{"text": "whole"}, {"prompt": "q", "completion": "a"},
                        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    examples, report = load_sft(path)
    assert [e.prompt for e in examples] == [None, "q", [{"role": "user", "content": "q"}]]
    assert report.format == "sft" and report.records == 3


def test_split_eval_is_deterministic_and_complete():
    items = list(range(100))
    train, held = split_eval(items, 0.1, seed=3)
    assert (train, held) == split_eval(items, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == items and train == sorted(train)
    assert split_eval(items, 0.1, seed=4)[1] != held
    assert split_eval(items, 0.0, seed=3) == (items, [])
    assert split_eval([1, 2], 0.01, seed=0)[1] != []  # any positive fraction holds something out
    assert len(split_eval([1, 2], 0.9, seed=0)[0]) == 1  # ... and keeps something to train on


def test_tab_separated_files_are_read_and_a_wrong_delimiter_is_one_line(tmp_path):
    from preftune.errors import DataError

    (tmp_path / "pairs.tsv").write_text('prompt\tchosen\trejected\nwhat, then?\t"a\tb"\tc; d\n')
    pairs, _ = load_pairs(str(tmp_path / "pairs.tsv"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("what, then?", "a\tb", "c; d")]
    (tmp_path / "excel.csv").write_text("prompt;chosen;rejected\nq;a;b\n")  # a European spreadsheet's CSV
    with pytest.raises(DataError, match=r"^\S*excel\.csv: the header is one column, 'prompt;chosen;rejected': the "
                                        r"fields are separated by ';', not ','; save it with ',' between fields$"):
        load_pairs(str(tmp_path / "excel.csv"))
    (tmp_path / "commas.tsv").write_text("prompt,chosen,rejected\nq,a,b\n")
    with pytest.raises(DataError, match=r"separated by ',', not '\\t'; .* \(or name it \.csv\)$"):
        load_pairs(str(tmp_path / "commas.tsv"))


def test_a_missing_file_in_a_folder_here_is_not_asked_of_the_hub(tmp_path, monkeypatch):
    """`data/pairs` (the file is data/pairs.jsonl) has a Hub id's form; with a folder `data` here it is a
    mistyped path, said at once instead of after the Hub's retries."""
    import preftune.data.sources as sources
    from preftune.errors import DataError

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "_hub_dataset", lambda *a: pytest.fail("the Hub was asked"))
    with pytest.raises(DataError, match=r"^data/pairs: file not found; check the path"):
        read_rows("data/pairs")
    asked = []
    monkeypatch.setattr(sources, "_hub_dataset", lambda name, split: asked.append(name) or iter(()))
    read_rows("someone/pairs")                       # no folder `someone` here: still a Hub id
    assert asked == ["someone/pairs"]


def test_reading_parquet_leaves_a_process_that_exits_cleanly(tmp_path):
    """Arrow's workers released the Python bytes a Parquet file was read from after the read; when that came while
    the interpreter exited, the process aborted (exit code 134) after `data check` had printed its report, in
    about two runs of three."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    user = {"role": "user", "content": "Name a fruit."}
    rows = [{"prompt": [user], "chosen": [{"role": "assistant", "content": f"Apple {i}."}],
             "rejected": [{"role": "assistant", "content": "A car."}], "source": "x"} for i in range(50)]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    codes = [subprocess.run([sys.executable, "-m", "preftune", "data", "check", str(path)], capture_output=True,
                            env=env, timeout=120).returncode for _ in range(5)]
    assert codes == [0] * 5


def test_a_csv_quote_never_closed_is_named_by_its_line(tmp_path):
    """It took the rest of the file into one cell: one record, refused for a missing answer far from the cause."""
    path = tmp_path / "pairs.csv"
    from preftune.errors import DataError

    path.write_text('prompt,chosen,rejected\nq,a,b\n"q2,a2,b2\nq3,a3,b3\n')
    with pytest.raises(DataError, match=r"pairs\.csv line 3: a quoted field opened there is never closed"):
        load_pairs(str(path))
