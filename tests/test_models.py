"""Model and tokenizer loading: sensible device/dtype, a tokenizer without a pad token works, clear errors."""

from __future__ import annotations

import pytest
import torch
from tinylm import make_tokenizer

from preftune.errors import ModelError
from preftune.models.load import load_model, load_tokenizer
from preftune.models.precision import Precision, pick_device, pick_dtype, pick_precision


def test_cpu_defaults():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert pick_precision("auto", torch.device("cpu")) == Precision(torch.float32, torch.float32, None)
    # mixed: trained weights and optimizer state fp32, compute and frozen weights bf16
    assert pick_precision("mixed", torch.device("cpu")) == Precision(torch.float32, torch.bfloat16, torch.bfloat16)


def test_tokenizer_without_pad_token_gets_eos(tmp_path):
    tok = make_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id is not None


def test_missing_and_wrong_folders(tmp_path):
    with pytest.raises(ModelError, match="folder not found"):
        load_model(str(tmp_path / "nope"), device=torch.device("cpu"), dtype=torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"), device=torch.device("cpu"), dtype=torch.float32)


def test_a_truncated_weights_file_is_one_error(tmp_path, tiny_model_dir):
    import shutil

    copy = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match=f"model {copy}: cannot be loaded"):
        load_model(str(copy), device=torch.device("cpu"), dtype=torch.float32)


def test_a_reference_with_another_vocabulary_is_refused(tiny_model_dir):
    """Its log-probs would score the policy's token ids as other tokens: rewards silently wrong."""
    import preftune
    from preftune.demo.base import tiny_llama
    from tinylm import fact_pairs

    other = tiny_llama(len(make_tokenizer()) + 64, hidden=32, layers=2, heads=4, pad_id=0)
    with pytest.raises(ModelError, match="its vocabulary has 364 tokens and the policy's 300"):
        preftune.train("dpo", model=str(tiny_model_dir), ref_model=other, data=fact_pairs(8), output_dir=None,
                       max_steps=1, batch_size=4)


def _copy(tiny_model_dir, tmp_path, name):
    import shutil

    return shutil.copytree(tiny_model_dir, tmp_path / name)


def test_weights_missing_from_the_files_are_refused_not_drawn_at_random(tmp_path, tiny_model_dir):
    """transformers only warns (and preftune quiets it): the run would train a random output head."""
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_model_dir, tmp_path, "missing")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["lm_head.weight"], weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=rf"model {folder}: its weight files lack lm_head.weight, "
                                         r"model.layers.1.mlp.up_proj.weight, which would start from random"):
        load_model(str(folder), device=torch.device("cpu"), dtype=torch.float32)


def test_a_config_that_does_not_fit_the_weights_is_one_error(tmp_path, tiny_model_dir):
    import json

    folder = _copy(tiny_model_dir, tmp_path, "shape")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    with pytest.raises(ModelError, match="its weights do not have the shapes its config.json gives"):
        load_model(str(folder), device=torch.device("cpu"), dtype=torch.float32)
    (folder / "config.json").write_text(json.dumps([config]))
    with pytest.raises(ModelError, match=rf"model {folder}: cannot read its config"):
        load_model(str(folder), device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ModelError, match=rf"{folder}: its tokenizer cannot be loaded"):
        load_tokenizer(str(folder))


def test_a_tokenizer_past_the_model_vocabulary_is_refused_in_every_command(tmp_path, tiny_model_dir):
    """A model whose embedding has fewer rows than the tokenizer's ids: an IndexError deep in the forward."""
    import preftune
    from preftune.demo.base import tiny_llama
    from tinylm import fact_pairs

    small = tiny_llama(50, hidden=32, layers=2, heads=4, pad_id=0)
    small.save_pretrained(tmp_path / "small")
    make_tokenizer().save_pretrained(tmp_path / "small")
    expected = r"its vocabulary has 50 tokens, but the tokenizer gives ids up to \d+; use the tokenizer"
    with pytest.raises(ModelError, match=rf"--model {tmp_path / 'small'}: {expected}"):
        preftune.train("dpo", model=str(tmp_path / "small"), data=fact_pairs(8), output_dir=None, max_steps=1,
                       batch_size=4)
    with pytest.raises(ModelError, match=rf"--ref-model {tmp_path / 'small'}: {expected}"):
        preftune.evaluate(model=str(tiny_model_dir), ref_model=str(tmp_path / "small"), data=fact_pairs(4))
    with pytest.raises(ModelError, match=rf"--model {tmp_path / 'small'}: {expected}"):
        preftune.train("dpo", model=str(tmp_path / "small"), data=fact_pairs(8), output_dir=None, max_steps=1,
                       batch_size=4, precompute_ref=True, ref_cache_dir=str(tmp_path / "cache"))
    from preftune.generate import generate_answers

    with pytest.raises(ModelError, match=expected):
        generate_answers(small, make_tokenizer(), [[1, 2, 200]], max_new_tokens=2, temperature=0.0, top_p=1.0, seed=0,
                         device=torch.device("cpu"))
