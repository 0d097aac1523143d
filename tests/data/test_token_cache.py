"""Tokenised data in worker processes equals the serial result; the on-disk cache gives back exactly what was
tokenised, misses when anything that shapes the ids changes, and never trusts a damaged entry."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from tinylm import make_tokenizer, write_jsonl

from preftune.data import token_cache
from preftune.data.load import load_pairs, load_sft
from preftune.data.records import PreferencePair, SFTExample
from preftune.data.token_cache import tokenize_cached
from preftune.data.parallel import tokenize_parallel
from preftune.data.tokenize import tokenize_all, tokenize_example, tokenize_pair
from preftune.errors import DataError

OPTIONS = {"max_length": 24, "max_prompt_length": None, "raw_text_prompts": False, "last_turn_only": False}
SETTINGS = {"stage": "dpo", "data_format": None, "split": "train", "part": "all"}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _pairs() -> list[PreferencePair]:
    """Text and chat pairs; some long enough to be cut, some whose prompt alone is too long (dropped)."""
    words = "the capital of france is paris . cats chase mice and dogs chase cats .".split()
    out = []
    for i in range(40):
        prompt = " ".join(words[: 3 + i % 12])
        if i % 7 == 6:
            prompt = " ".join(words * 4)  # longer than max_length: no room for an answer
        if i % 2:
            out.append(PreferencePair(prompt, " " + " ".join(words[i % 5:]), " rome .", where=f"line {i + 1}"))
        else:
            out.append(PreferencePair([{"role": "user", "content": prompt}],
                                      [{"role": "assistant", "content": " ".join(words[: i % 9 + 1])}],
                                      [{"role": "assistant", "content": "rome"}], system="be brief" if i % 4 else None,
                                      where=f"line {i + 1}"))
    return out


def _examples() -> list[SFTExample]:
    out = []
    for i in range(30):
        if i % 2:
            out.append(SFTExample(completion="cats chase mice " * (1 + i % 5), where=f"line {i + 1}"))
        else:
            turns = [{"role": "assistant", "content": "paris"}, {"role": "user", "content": "and italy ?"},
                     {"role": "assistant", "content": "rome " * (1 + i % 6)}]
            out.append(SFTExample(completion=turns, prompt=[{"role": "user", "content": "capital of france ?"}],
                                  where=f"line {i + 1}"))
    return out


def _serial_pairs(tok, pairs):
    """The plain path, one record at a time: what every other path must equal."""
    out = [tokenize_pair(tok, p, max_length=24, index=i) for i, p in enumerate(pairs)]
    return [t for t in out if t is not None]


def test_parallel_pairs_equal_serial(tok):
    pairs = _pairs()
    expected = _serial_pairs(tok, pairs)
    items, stats = tokenize_parallel(tok, pairs, 3, OPTIONS)
    assert items == expected
    assert 0 < len(items) < len(pairs)  # the fixture does drop some, so positions are not just 0..n-1
    assert stats.as_dict() == {"total": 40, "truncated": sum(t.truncated for t in expected),
                               "dropped": 40 - len(expected)}
    assert stats.truncated > 0


def test_parallel_sft_equals_serial_with_masks(tok):
    examples = _examples()
    expected = [tokenize_example(tok, e, max_length=48, index=i) for i, e in enumerate(examples)]
    expected = [t for t in expected if t is not None]
    items, stats = tokenize_parallel(tok, examples, 2, {**OPTIONS, "max_length": 48})
    assert stats.truncated > 0
    assert items == expected
    assert any(t.answer_mask is not None and 0 in t.answer_mask for t in items)  # masks travel too
    assert any(t.answer_mask is None for t in items)


def test_parallel_raises_the_first_bad_record_as_serial_does(tok):
    pairs = _pairs()
    for i in (5, 30):  # a chat answer that is not an assistant turn: the template cannot separate it
        pairs[i] = PreferencePair([{"role": "user", "content": "hi"}], [{"role": "user", "content": "x"}],
                                  [{"role": "assistant", "content": "y"}], where=f"line {i + 1}")
    with pytest.raises(DataError) as serial:
        tokenize_all(tok, pairs, **OPTIONS)
    with pytest.raises(DataError) as parallel:
        tokenize_parallel(tok, pairs, 3, OPTIONS)
    assert "line 6" in str(serial.value)
    assert str(parallel.value) == str(serial.value)


# ------------------------------------------------------------------------------------------------ the cache
@pytest.fixture
def pairs_file(tmp_path) -> Path:
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in _pairs() if
            isinstance(p.prompt, str)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def _run(tok, path, cache_dir, settings=SETTINGS, options=OPTIONS, **kw):
    records, _ = load_pairs(str(path))
    return tokenize_cached(tok, records, source=str(path), settings=settings, options=options, cache_dir=cache_dir,
                           procs=1, **kw)


def _no_tokenising(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("tokenised although the cache holds this entry")
    monkeypatch.setattr(token_cache, "tokenize_packed", refuse)


def test_a_hit_returns_the_same_items_without_tokenising(tok, pairs_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    items, stats, message = _run(tok, pairs_file, cache)
    records, _ = load_pairs(str(pairs_file))
    assert items == _serial_pairs(tok, records)
    assert "saved to" in message and len(list(cache.glob("*.safetensors"))) == 1
    _no_tokenising(monkeypatch)
    again, again_stats, message = _run(tok, pairs_file, cache)
    assert message.startswith("tokenized data: reused")
    assert again == items and again_stats == stats


def _variants(tok, tmp_path, pairs_file):
    """(name, kwargs for _run) each changing one part of the key."""
    other_file = tmp_path / "other.jsonl"
    other_file.write_text(pairs_file.read_text().replace("rome", "milan", 1))
    templated = copy.deepcopy(tok)
    templated.chat_template = tok.chat_template + " "
    added = copy.deepcopy(tok)
    added.add_tokens(["chase"])
    yield "data file content", {"path": other_file}
    yield "tokenizer chat template", {"tok": templated}
    yield "tokenizer vocabulary", {"tok": added}
    for key, value in (("stage", "sft"), ("data_format", "text"), ("split", "test"), ("part", "train")):
        yield f"setting {key}", {"settings": {**SETTINGS, key: value}}
    for key, value in (("max_length", 25), ("max_prompt_length", 12), ("raw_text_prompts", True),
                       ("last_turn_only", True)):
        yield f"option {key}", {"options": {**OPTIONS, key: value}}


def test_changing_any_part_of_the_key_misses(tok, pairs_file, tmp_path):
    cache = tmp_path / "cache"
    _run(tok, pairs_file, cache)
    seen = 1
    for name, change in _variants(tok, tmp_path, pairs_file):
        kwargs = {"tok": tok, "path": pairs_file, **change}
        _, _, message = _run(kwargs.pop("tok"), kwargs.pop("path"), cache, **kwargs)
        seen += 1
        assert "saved to" in message, name
        assert len(list(cache.glob("*.safetensors"))) == seen, name


def test_the_same_file_elsewhere_and_a_reloaded_tokenizer_hit(tok, pairs_file, tmp_path, monkeypatch):
    """The key is content, not paths: a copy of the data and a tokenizer saved and read back reuse the entry."""
    from transformers import AutoTokenizer

    cache = tmp_path / "cache"
    _run(tok, pairs_file, cache)
    moved = tmp_path / "elsewhere" / "renamed.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(pairs_file.read_bytes())
    tok.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    _no_tokenising(monkeypatch)
    _, _, message = _run(reloaded, moved, cache)
    assert message.startswith("tokenized data: reused")


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "garbage", "empty"])
def test_a_damaged_entry_is_rebuilt_never_trusted(tok, pairs_file, tmp_path, damage):
    cache = tmp_path / "cache"
    items, _, _ = _run(tok, pairs_file, cache)
    (entry,) = cache.glob("*.safetensors")
    data = entry.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped byte":  # inside the token ids, past the header: only the checksum can tell
        at = len(data) - 9
        data = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
    elif damage == "garbage":
        data = b"not a safetensors file at all"
    else:
        data = b""
    entry.write_bytes(data)
    again, _, message = _run(tok, pairs_file, cache)
    assert "saved to" in message
    assert again == items
    assert entry.read_bytes() != data  # rewritten whole


def test_an_entry_for_another_record_count_is_not_used(tok, pairs_file, tmp_path):
    cache = tmp_path / "cache"
    _run(tok, pairs_file, cache)
    records, _ = load_pairs(str(pairs_file))
    fewer, _, message = tokenize_cached(tok, records[:-1], source=str(pairs_file), settings=SETTINGS,
                                        options=OPTIONS, cache_dir=cache, procs=1)
    assert "saved to" in message
    assert fewer == _serial_pairs(tok, records[:-1])


def test_off_or_in_memory_writes_nothing(tok, pairs_file, tmp_path):
    records, _ = load_pairs(str(pairs_file))
    items, _, message = tokenize_cached(tok, records, source=str(pairs_file), settings=SETTINGS, options=OPTIONS,
                                        cache_dir=None)
    assert message == "" and items == _serial_pairs(tok, records)
    cache = tmp_path / "cache"
    _, _, message = tokenize_cached(tok, records, source=None, settings=SETTINGS, options=OPTIONS, cache_dir=cache)
    assert message == "" and not cache.exists()


def test_sft_entries_round_trip(tok, tmp_path, monkeypatch):
    rows = [{"messages": [{"role": "user", "content": "capital of france ?"}, {"role": "assistant", "content": "paris"},
                          {"role": "user", "content": "and italy ?"}, {"role": "assistant", "content": "rome " * k}]}
            for k in range(1, 8)] + [{"text": "cats chase mice " * k} for k in range(1, 6)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    records, _ = load_sft(str(path))
    settings = {**SETTINGS, "stage": "sft"}
    cache = tmp_path / "cache"
    items, stats, _ = tokenize_cached(tok, records, source=str(path), settings=settings, options=OPTIONS,
                                      cache_dir=cache, procs=2)
    assert items == tokenize_all(tok, records, **OPTIONS)[0]
    _no_tokenising(monkeypatch)
    again, _, message = tokenize_cached(tok, records, source=str(path), settings=settings, options=OPTIONS,
                                        cache_dir=cache)
    assert message.startswith("tokenized data: reused") and again == items


def test_under_torchrun_the_main_process_writes_and_the_others_read(tok, pairs_file, tmp_path, monkeypatch):
    """Rank 0 tokenises and writes before the barrier; another rank reads after it, tokenising nothing; a rank
    that finds no entry (a cache folder not shared between machines) tokenises for itself."""
    cache = tmp_path / "cache"
    calls = []
    items, _, _ = _run(tok, pairs_file, cache, is_main=True,
                       barrier=lambda: calls.append(len(list(cache.glob("*.safetensors")))))
    assert calls == [1]  # the entry existed when the main process reached the barrier
    real = token_cache.tokenize_packed
    _no_tokenising(monkeypatch)
    other, _, message = _run(tok, pairs_file, cache, is_main=False, barrier=lambda: None)
    assert other == items and message == ""
    monkeypatch.setattr(token_cache, "tokenize_packed", real)
    alone, _, _ = _run(tok, pairs_file, tmp_path / "not-shared", is_main=False)
    assert alone == items and not (tmp_path / "not-shared").exists()


def test_small_data_stays_in_one_process():
    from preftune.data.parallel import PARALLEL_FROM, auto_procs

    assert auto_procs(PARALLEL_FROM - 1) == 1
    assert 1 <= auto_procs(PARALLEL_FROM) <= 8


def _rank_main(rank: int, port: int, path: str, cache: str, out: str) -> None:
    """One of two processes of a gloo group; rank 1 may not tokenise, only read what rank 0 wrote."""
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        if rank == 1:
            def refuse(*a, **k):
                raise AssertionError("rank 1 tokenised")
            token_cache.tokenize_packed = refuse
        items, _, _ = _run(make_tokenizer(), path, Path(cache), is_main=rank == 0, barrier=dist.barrier)
        rows = [[it.index, it.prompt_ids, it.chosen_ids, it.rejected_ids] for it in items]
        Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def test_two_processes_tokenise_once(pairs_file, tmp_path):
    import json
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "cache"
    tmp.start_processes(_rank_main, args=(port, str(pairs_file), str(cache), str(tmp_path)), nprocs=2,
                        start_method="fork")
    records, _ = load_pairs(str(pairs_file))
    expected = [[it.index, it.prompt_ids, it.chosen_ids, it.rejected_ids] for it in _serial_pairs(make_tokenizer(),
                                                                                                  records)]
    assert json.loads((tmp_path / "rank0.json").read_text()) == expected
    assert json.loads((tmp_path / "rank1.json").read_text()) == expected
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_without_a_home_directory_the_cache_is_off_not_a_crash(monkeypatch):
    """No XDG_CACHE_HOME, no HOME and a user id without a passwd entry (a container run with --user)."""
    from preftune.training import reference_cache

    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(no_home))
    assert token_cache.default_cache_dir() is None and reference_cache.default_cache_dir() is None
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert token_cache.default_cache_dir() == Path("/somewhere/preftune/tokenized")
