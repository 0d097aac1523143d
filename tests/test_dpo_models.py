"""DPO on models whose configs carry training-time behaviour: dropout, router load-balancing losses."""

from __future__ import annotations

import json
import math

import pytest

from families import tiny
from tinylm import fact_pairs, make_tokenizer, write_jsonl
from preftune.training import loop as train
from test_resume import config


def model_dir(tmp_path, family: str, **overrides):
    tok = make_tokenizer()
    model = tiny(family, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                 bos_token_id=tok.bos_token_id, **overrides)
    model.save_pretrained(tmp_path / family)
    tok.save_pretrained(tmp_path / family)
    return tmp_path / family


def first_step(tmp_path, model, **overrides) -> dict:
    data = write_jsonl(tmp_path / "pairs.jsonl", fact_pairs(8))
    out = tmp_path / ("run-" + "-".join(f"{k}{v}" for k, v in overrides.items()))
    train.run(config(model, data, out, max_steps=1, **overrides), command="preftune dpo")
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


# GPT-2's dropout is in nn.Dropout modules; OPT's rates are floats its modules pass to functional.dropout
# themselves, and its layerdrop skips whole layers at random.
@pytest.mark.parametrize("family, rates", [
    ("gpt2", {}),
    ("opt", {"dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1, "layerdrop": 0.3})])
def test_a_policy_equal_to_its_reference_starts_at_log_2_whatever_dropout_its_config_ships(tmp_path, family, rates):
    model = model_dir(tmp_path, family, **rates)
    assert json.loads((model / "config.json").read_text())["resid_pdrop" if family == "gpt2" else "dropout"] == 0.1
    row = first_step(tmp_path, model)
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-7) and row["reward_margin"] == 0.0
    # With the dropout the config ships, the two forwards differ: the first loss is noise around log 2.
    kept = first_step(tmp_path, model, disable_dropout=False)
    assert abs(kept["loss"] - math.log(2)) > 1e-4


def test_the_run_log_says_which_layout_the_model_takes(tmp_path, capsys):
    model = model_dir(tmp_path, "mistral")
    first_step(tmp_path, model, quiet=False)
    assert ("layout: MistralForCausalLM: packed (prompts once, answers after them, one row without padding); "
            "sliding window 16: pairs whose prompt + answer fit it") in capsys.readouterr().out
    for off in ({"packing": False}, {"trim_padding": False}):
        first_step(tmp_path, model, quiet=False, **off)
        assert "layout: MistralForCausalLM: prefix-shared; sliding window 16" in capsys.readouterr().out


def test_compile_compiles_both_decoders_and_takes_the_plain_layout(tmp_path, monkeypatch, capsys):
    from preftune.logps import answer
    from preftune.training import setup

    compiled, layouts = [], []

    def compile_body(model):  # compiling takes minutes; the MLPs it gets are the class's (no graph break a layer)
        compiled.append(model)
        assert not any("forward" in vars(m) for m in model.modules() if type(m).__name__ == "MistralMLP")

    monkeypatch.setattr(setup, "_compile_body", compile_body)
    plain = answer.plain_logps
    monkeypatch.setattr(answer, "shared_prefix_logps", lambda *a, **k: layouts.append("shared"))
    monkeypatch.setattr(answer, "plain_logps", lambda *a, **k: layouts.append("plain") or plain(*a, **k))
    model = model_dir(tmp_path, "mistral")
    row = first_step(tmp_path, model, quiet=False, compile=True)
    assert len(compiled) == 2 and compiled[0] is not compiled[1]  # the policy, then the frozen reference
    assert "layout: MistralForCausalLM: plain (--compile)" in capsys.readouterr().out
    assert set(layouts) == {"plain"} and row["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_compile_takes_the_decoder_layer_by_layer():
    from preftune.logps.parts import width_multiple
    from preftune.training.setup import _compile_body

    model = tiny("mistral")
    _compile_body(model)  # lazy: nothing compiles before a forward
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.model._compiled_call_impl is None  # one graph for all layers, not the whole body's
    assert width_multiple(model) == 8  # aligned widths: the graph is not recompiled for every other length
