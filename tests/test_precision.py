"""Mixed precision: fp32 trained weights, bf16 compute. Checked on the CPU against the fp32 computation."""

from __future__ import annotations

import math

import torch
from tinylm import fact_pairs, make_tokenizer, write_jsonl

from preftune.config import TrainConfig
from preftune.data.batching import collate
from preftune.data.records import PreferencePair
from preftune.data.tokenize import tokenize_all
from preftune.logps.answer import answer_logps
from preftune.logps.parts import set_compute_dtype
from preftune.models.load import load_model
from preftune.training.loop import run


def _batch():
    tok = make_tokenizer()
    pairs = [PreferencePair(p["prompt"], p["chosen"], p["rejected"]) for p in fact_pairs(6)]
    items, _ = tokenize_all(tok, pairs, max_length=64)
    return collate(items, tok.pad_token_id)


def test_mixed_logps_and_gradients_track_fp32(tiny_model_dir):
    batch = _batch()
    results = {}
    for name, compute in (("fp32", None), ("mixed", torch.bfloat16)):
        model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
        set_compute_dtype(model, compute)
        out = answer_logps(model, batch, chunk_size=4).logps
        out.sum().backward()
        results[name] = (out.detach(), model.lm_head.weight.grad.clone(), model.lm_head.weight.dtype)
    fp32, mixed = results["fp32"], results["mixed"]
    assert mixed[2] == torch.float32                                  # weights stay fp32
    assert not torch.equal(fp32[0], mixed[0])                         # the compute really ran in bf16
    assert torch.allclose(fp32[0], mixed[0], rtol=3e-2, atol=0.5)     # to bf16 accuracy
    cos = torch.nn.functional.cosine_similarity(fp32[1].flatten(), mixed[1].flatten(), dim=0)
    assert cos > 0.99                                                 # backward recomputes at the forward's precision


def test_mixed_dpo_run(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", fact_pairs(8))
    final = run(TrainConfig(stage="dpo", model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "r"),
                            dtype="mixed", max_steps=3, batch_size=4, lr=1e-3, quiet=True), command="test")
    assert math.isfinite(final["loss"]) and final["loss"] < math.log(2) + 0.05
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "r" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())     # the trained weights were fp32 throughout
