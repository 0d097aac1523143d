"""AdamW on a row-sparse embedding gradient: the same update as torch's AdamW on the dense gradient, the same
clipping, exact resume, and whole runs that match the dense path."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinylm import fact_pairs, write_jsonl
from preftune.config import TrainConfig
from preftune.logps import parts
from preftune.training import loop as train
from preftune.training import setup as run_setup
from preftune.training.optim import AdamW, clip_grad_norm

V, H = 50, 6


def sparse_grad(rows: list[int], seed: int) -> torch.Tensor:
    """An uncoalesced row-sparse gradient (repeated rows, as an embedding lookup gives) and nothing else."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(len(rows), H, generator=g)
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, (V, H))


STEPS = [[3, 7, 7, 10], [7, 11], [0, 3, 3, 3, 49], [11]]  # rows seen per step: new ones, repeats, absences


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("fused", [False, True])
def test_row_sparse_step_equals_dense_adamw(weight_decay, fused):
    start = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    sparse_p = torch.nn.Parameter(start.clone())
    dense_p = torch.nn.Parameter(start.clone())
    kw = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    ours = AdamW([sparse_p], **kw, fused=fused or None)
    plain = torch.optim.AdamW([dense_p], **kw, foreach=False)
    for step, rows in enumerate(STEPS):
        grad = sparse_grad(rows, seed=step)
        sparse_p.grad, dense_p.grad = grad, grad.to_dense()
        for opt in (ours, plain):
            opt.param_groups[0]["lr"] = 0.01 / (step + 1)  # as a schedule changes it
            opt.step()
        torch.testing.assert_close(sparse_p.data, dense_p.data, rtol=0, atol=1e-6)
    state = ours.state[sparse_p]
    assert state["rows"].tolist() == [0, 3, 7, 10, 11, 49]
    assert state["exp_avg"].shape == (6, H)
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[state["rows"]] = False
    expected = start[untouched] * (1 - weight_decay * torch.tensor([0.01 / (s + 1) for s in range(4)])).prod()
    torch.testing.assert_close(sparse_p.data[untouched], expected, rtol=1e-6, atol=0)


def test_bf16_rows_round_once_as_torchs_fused_step():
    start = torch.randn(V, H, generator=torch.Generator().manual_seed(0)).bfloat16()
    sparse_p, dense_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    kw = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    ours, plain = AdamW([sparse_p], **kw), torch.optim.AdamW([dense_p], **kw)
    for step, rows in enumerate(STEPS):
        grad = sparse_grad(rows, seed=step).bfloat16()
        sparse_p.grad, dense_p.grad = grad, grad.to_dense()
        ours.step()
        plain.step()
    assert ours.state[sparse_p]["exp_avg"].dtype == torch.bfloat16
    differ = (sparse_p.data != dense_p.data).float().mean().item()
    assert differ < 0.01, f"{differ:.1%} of the weights differ from torch's fused bf16 step"
    torch.testing.assert_close(sparse_p.data, dense_p.data, rtol=1e-2, atol=1e-3)


def test_dense_gradients_take_torchs_step_alongside():
    torch.manual_seed(0)
    emb, lin = torch.nn.Parameter(torch.randn(V, H)), torch.nn.Parameter(torch.randn(3, H))
    emb_d, lin_d = torch.nn.Parameter(emb.detach().clone()), torch.nn.Parameter(lin.detach().clone())
    ours = AdamW([emb, lin], lr=0.1)
    plain = torch.optim.AdamW([emb_d, lin_d], lr=0.1)
    for step, rows in enumerate(STEPS):
        g = sparse_grad(rows, seed=step)
        emb.grad, emb_d.grad = g, g.to_dense()
        lin.grad = torch.full((3, H), float(step + 1))
        lin_d.grad = lin.grad.clone()
        ours.step()
        plain.step()
    torch.testing.assert_close(emb.data, emb_d.data, rtol=0, atol=1e-6)
    assert torch.equal(lin.data, lin_d.data)


def test_clipping_over_sparse_and_dense_gradients_is_torchs():
    emb, lin = torch.nn.Parameter(torch.zeros(V, H)), torch.nn.Parameter(torch.zeros(3, H))
    emb.grad, lin.grad = sparse_grad([1, 1, 4], seed=5), torch.ones(3, H)
    dense = [torch.nn.Parameter(torch.zeros(V, H)), torch.nn.Parameter(torch.zeros(3, H))]
    dense[0].grad, dense[1].grad = emb.grad.to_dense(), torch.ones(3, H)
    expected = torch.nn.utils.clip_grad_norm_(dense, 1.0)
    total = clip_grad_norm([emb, lin], 1.0)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(emb.grad.to_dense(), dense[0].grad)
    torch.testing.assert_close(lin.grad, dense[1].grad)
    # max_norm 0: the norm is reported, nothing is scaled
    lin.grad = torch.full((3, H), 10.0)
    before = emb.grad.to_dense().clone()
    clip_grad_norm([emb, lin], 0.0)
    assert torch.equal(emb.grad.to_dense(), before) and torch.equal(lin.grad, torch.full((3, H), 10.0))


def test_checkpointed_state_is_dense_and_resumes_exactly():
    def fresh():
        p = torch.nn.Parameter(torch.randn(V, H, generator=torch.Generator().manual_seed(1)))
        return p, AdamW([p], lr=0.05, weight_decay=0.01)

    whole_p, whole = fresh()
    for step, rows in enumerate(STEPS):
        whole_p.grad = sparse_grad(rows, seed=step)
        whole.step()
    part_p, part = fresh()
    for step, rows in enumerate(STEPS[:2]):
        part_p.grad = sparse_grad(rows, seed=step)
        part.step()
    buffer = io.BytesIO()
    torch.save({"p": part_p.detach(), "opt": part.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_p, resumed = fresh()
    resumed_p.data.copy_(saved["p"])
    resumed.load_state_dict(saved["opt"])
    assert saved["opt"]["state"][0]["exp_avg"].shape == (V, H)  # written out dense, as a sharded run writes it
    for step, rows in enumerate(STEPS[2:], start=2):
        resumed_p.grad = sparse_grad(rows, seed=step)
        resumed.step()
    assert torch.equal(resumed_p.data, whole_p.data)
    assert torch.equal(resumed.state[resumed_p]["rows"], whole.state[whole_p]["rows"])


# ------------------------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", fact_pairs(16))


def run_once(model: Path, data: Path, out: Path, **overrides) -> tuple[list[dict], dict]:
    values = dict(stage="dpo", model=str(model), data=str(data), output_dir=str(out), max_steps=4, batch_size=4,
                  lr=1e-2, max_length=64, device="cpu", dtype="float32", quiet=True, seed=0)
    values.update(overrides)
    train.run(TrainConfig(**values), command="preftune dpo")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("overrides", [dict(), dict(weight_decay=0.1, grad_accum=2, batch_size=2, max_grad_norm=0.5),
                                       dict(stage="kto", paired_as_unpaired=True)], ids=["dpo", "decay-accum-clip", "kto"])
def test_run_with_sparse_embedding_gradient_equals_dense(overrides, tmp_path, monkeypatch, tiny_model_dir,
                                                          pairs_file):
    seen = []
    real_step = AdamW._row_step
    monkeypatch.setattr(AdamW, "_row_step", lambda self, p, g: (seen.append(p.shape), real_step(self, p, g)))
    sparse_rows, sparse_w = run_once(tiny_model_dir, pairs_file, tmp_path / "sparse", **overrides)
    assert seen, "the embedding took the row-sparse step"
    real = parts.sparse_embedding_grad
    monkeypatch.setattr(run_setup, "sparse_embedding_grad", lambda model, on: real(model, False))
    dense_rows, dense_w = run_once(tiny_model_dir, pairs_file, tmp_path / "dense", **overrides)
    for a, b in zip(sparse_rows, dense_rows):
        for key in ("loss", "grad_norm", "rewards/margins"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for name in dense_w:
        torch.testing.assert_close(sparse_w[name], dense_w[name], rtol=0, atol=2e-6, msg=name)


def test_only_an_untied_plain_embedding_that_trains_takes_sparse_gradients():
    from transformers import LlamaConfig, LlamaForCausalLM

    def model(**kw):
        cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, **kw)
        return LlamaForCausalLM(cfg)

    untied = model(tie_word_embeddings=False)
    assert parts.sparse_embedding_grad(untied, True)
    assert not parts.sparse_embedding_grad(untied, False)  # switched back off, as a later run may need
    tied = model(tie_word_embeddings=True)
    assert not parts.sparse_embedding_grad(tied, True)  # the head's gradient fills every row anyway
    frozen = model(tie_word_embeddings=False)
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert not parts.sparse_embedding_grad(frozen, True)
    ids = torch.tensor([[1, 2, 2, 7]])
    parts.sparse_embedding_grad(untied, True)
    out = parts.embed_tokens(untied, ids)
    assert torch.equal(out, untied.get_input_embeddings()(ids))
    out.sum().backward()
    grad = untied.get_input_embeddings().weight.grad
    assert grad.is_sparse and torch.equal(grad.to_dense()[2], torch.full((16,), 2.0))
