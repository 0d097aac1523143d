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
