"""--precompute-ref: reference log-probs computed once, keyed by weights + data + settings, reused by later runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from tinylm import fact_pairs, make_model_dir, write_jsonl
from oracle import full_logits_logps
from preftune.config import TrainConfig
from preftune.data.batching import collate
from preftune.data.records import PreferencePair
from preftune.data.tokenize import tokenize_all
from preftune.models.load import load_model, load_tokenizer
from preftune.training import reference_cache as rc
from preftune.training import setup as setup_mod
from preftune.training.reference import CachedReference, FrozenReference

SETTINGS = {"max_length": 64, "max_prompt_length": None, "dtype": "torch.float32"}


def items_for(model_dir: Path, max_length: int = 64, n: int = 12):
    tok = load_tokenizer(str(model_dir))
    records = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], None, f"line {i}")
               for i, r in enumerate(fact_pairs(n))]
    return tok, tokenize_all(tok, records, max_length=max_length)[0]


def test_cached_logps_equal_live_reference_logps(tiny_model_dir):
    tok, items = items_for(tiny_model_dir)
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    table = rc.compute_table(model, items, pad_id=tok.pad_token_id, device="cpu", batch_size=5,
                             prefix_sharing=True, chunk_size=7)
    cached, live = CachedReference(table), FrozenReference(model)
    for s in (0, 4, 8):
        batch = collate(items[s:s + 4], tok.pad_token_id)
        with torch.no_grad():
            plain = full_logits_logps(model, batch).logps
        torch.testing.assert_close(cached.logps(batch), live.logps(batch), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached.logps(batch), plain, rtol=1e-5, atol=1e-5)


def test_the_table_is_computed_in_the_layout_the_run_asks_for(tiny_model_dir, monkeypatch, sharing_is_cheap):
    from test_families import spy_on

    tok, items = items_for(tiny_model_dir)
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    names = ("packed_logps", "shared_prefix_logps", "plain_logps")
    ran = spy_on(monkeypatch, *names)
    tables = {}
    for packing, trim in ((True, True), (False, True), (True, False)):
        for calls in ran.values():
            calls.clear()
        tables[packing, trim] = rc.compute_table(model, items, pad_id=tok.pad_token_id, device="cpu", batch_size=5,
                                                 prefix_sharing=True, chunk_size=7, trim_padding=trim,
                                                 packing=packing)
        # Packing needs trimmed padding: without either, the padded prefix-shared layout
        took = {name for name in names if ran[name]}
        assert took == ({"packed_logps"} if packing and trim else {"shared_prefix_logps"})
    for table in tables.values():
        torch.testing.assert_close(table, tables[True, True], rtol=1e-5, atol=1e-5)


def test_the_key_follows_weights_data_and_settings(tmp_path, tiny_model_dir):
    _, items = items_for(tiny_model_dir)
    weights = rc.weights_digest(str(tiny_model_dir))
    key = rc.cache_key(weights, items, SETTINGS)
    assert key == rc.cache_key(rc.weights_digest(str(tiny_model_dir)), items, dict(SETTINGS))
    assert key != rc.cache_key(weights, items, {**SETTINGS, "max_length": 32})
    assert key != rc.cache_key(weights, items[1:], SETTINGS)
    other = make_model_dir(tmp_path / "other", seed=1)
    assert rc.weights_digest(str(other)) != weights
    # Same bytes in another folder: same key (the content counts, not the path).
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert rc.weights_digest(str(copy)) == weights


def test_cache_dir_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert rc.default_cache_dir() == tmp_path / "preftune" / "ref"


def test_an_unreadable_table_is_recomputed(tmp_path, tiny_model_dir):
    tok, items = items_for(tiny_model_dir)
    calls = []

    def load():
        calls.append(1)
        return load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)

    def compute(model, its):
        return rc.compute_table(model, its, pad_id=tok.pad_token_id, device="cpu", batch_size=4,
                                prefix_sharing=True, chunk_size=16)

    kwargs = dict(reference=str(tiny_model_dir), settings=SETTINGS, cache_dir=tmp_path, load_model=load,
                  compute=compute)
    first, _ = rc.cached_tables([rc.CacheRequest("train", items)], **kwargs)
    (path,) = tmp_path.glob("*.safetensors")
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: nothing half-written left beside it
    path.write_bytes(b"not a table")
    second, messages = rc.cached_tables([rc.CacheRequest("train", items)], **kwargs)
    assert len(calls) == 2 and "computed" in messages[0]
    torch.testing.assert_close(first["train"], second["train"])


def test_a_beta_sweep_loads_the_reference_once(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from preftune.training.loop import run

    loads = []
    real_load = setup_mod.load_model

    def counting_load(name, **kwargs):
        loads.append(name)
        return real_load(name, **kwargs)

    monkeypatch.setattr(setup_mod, "load_model", counting_load)
    data = write_jsonl(tmp_path / "pairs.jsonl", fact_pairs(16))
    for beta in (0.1, 0.5):
        cfg = TrainConfig(stage="dpo", model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / f"b{beta}"),
                          max_steps=2, batch_size=4, max_length=64, beta=beta, lr=1e-3, precompute_ref=True,
                          ref_cache_dir=str(tmp_path / "cache"), device="cpu")
        loads.clear()
        run(cfg, command="test")
        out = capsys.readouterr().out
        if beta == 0.1:
            assert len(loads) == 2 and "computed" in out  # reference, then policy
        else:
            assert len(loads) == 1 and "reused" in out    # the policy only
        # Step 1: the policy is the reference, so the cached numbers must give exactly log 2.
        first = json.loads((tmp_path / f"b{beta}" / "metrics.jsonl").read_text().splitlines()[0])
        assert abs(first["loss"] - math.log(2)) < 1e-5
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
