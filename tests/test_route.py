"""route.py: each layout a model may take is checked once against the model's own forward; a model whose own
forward does more than its decoder body and output head runs through it (whole.py), and a layout that differs
is not taken. Every number here is checked against the whole-model forward of each row (oracle.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from families import VOCAB, tiny
from oracle import full_logits_logps
from preftune.logps import answer, route
from preftune.logps.answer import answer_logps
from preftune.logps.packed import TreeRows, _tree_attention
from test_families import batch_of, spy_on
from test_logprobs import assert_close, logps_and_grads

SHAPES = [(3, 1, 7), (17, 5, 1), (2, 1, 1), (10, 6, 2)]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(answer, "_WARNED", set())


def twice_against_the_oracle(m, caplog, monkeypatch) -> tuple[list[str], dict[str, list[int]]]:
    """Two calls of `answer_logps` on the same batch, log-probs and gradients each checked against the whole-model
    forward: (warnings logged, batch sizes each layout function ran on)."""
    batch = batch_of(SHAPES)
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    ran = spy_on(monkeypatch, "packed_logps", "shared_prefix_logps", "plain_logps")
    with caplog.at_level(logging.WARNING, logger="preftune.logps.answer"):
        for _ in range(2):
            assert_close(logps_and_grads(m, lambda: answer_logps(m, batch, chunk_size=5)), plain)
    with torch.no_grad():  # also without gradients (a reference model)
        torch.testing.assert_close(answer_logps(m, batch).logps, plain[0], rtol=1e-5, atol=1e-5)
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING], ran


def bert_decoder():
    """A BERT-style causal LM: its head is dense -> activation -> layer norm before the output projection, which
    `get_output_embeddings()` alone leaves out."""
    import transformers as t

    torch.manual_seed(0)
    cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, is_decoder=True, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, pad_token_id=0)
    return t.BertLMHeadModel(cfg).float().train()


def test_a_head_that_transforms_before_projecting_runs_through_the_whole_forward(caplog, monkeypatch):
    said, ran = twice_against_the_oracle(bert_decoder(), caplog, monkeypatch)
    assert len(said) == 1 and "BertLMHeadModel: its own forward computes" in said[0] and "whole forward" in said[0]
    assert not any(ran.values())  # the batches took none of the layouts


def token_shift(m, weight: float = 0.5):
    """Layer 0's MLP output plus `weight` times that of the token before it in the same call (RWKV-style token
    mixing outside attention): exact for a row run alone or right-padded, wrong where one call holds several
    sequences in a row, or continues a sequence from a cache."""
    def hook(module, args, out):
        before = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        return out + weight * before

    m.model.layers[0].mlp.register_forward_hook(hook)
    return m


def test_a_model_that_mixes_neighbouring_tokens_takes_neither_the_packed_nor_the_shared_layout(caplog, monkeypatch,
                                                                                             sharing_is_cheap):
    said, ran = twice_against_the_oracle(token_shift(tiny("llama")), caplog, monkeypatch)
    assert len(said) == 2
    assert any("cannot run answers packed in one row (its log-probs differ" in s for s in said)
    assert any("cannot continue answers from a shared prompt cache (its log-probs differ" in s for s in said)
    assert ran == {"packed_logps": [], "shared_prefix_logps": [], "plain_logps": [len(SHAPES)] * 3}


def test_a_model_the_layouts_reproduce_is_checked_once_and_keeps_them(caplog, monkeypatch):
    m = tiny("llama")
    batch = batch_of(SHAPES)
    whole = []
    real = route.whole_logps
    monkeypatch.setattr(route, "whole_logps", lambda mm, b, **kw: whole.append(b.size) or real(mm, b, **kw))
    ran = spy_on(monkeypatch, "packed_logps")
    with caplog.at_level(logging.WARNING, logger="preftune.logps.answer"):
        for _ in range(3):
            answer_logps(m, batch)
    assert whole == [2]  # one probe of two pairs, on the first call only
    assert ran["packed_logps"] == [len(SHAPES)] * 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert m.training  # the probe ran in eval mode (no dropout) and gave the mode back


def test_the_probe_keeps_the_first_pairs_short_and_of_different_lengths():
    batch = batch_of([(12, 9, 3), (11, 2, 8), (4, 4, 4)])
    probe = route._probe(batch)
    assert probe.lengths() == ([8, 7], [6, 3, 2, 5])
    assert probe.prompt_ids.tolist() == batch.prompt_ids[:2, :8].tolist()
    assert probe.answer_ids.tolist() == batch.answer_ids[:4, :6].tolist()


def test_packed_attention_refuses_a_mask_of_the_models_own():
    rows = TreeRows([2], [1, 1], k=2, device=torch.device("cpu"))
    q = k = v = torch.randn(1, 2, 4, 8)
    module = torch.nn.Module()
    with pytest.raises(NotImplementedError, match="mask or bias of its own"):
        _tree_attention(rows, module, q, k, v, attention_mask=torch.zeros(1, 1, 4, 4))


def test_packed_attention_takes_keys_already_repeated_to_every_head():
    """Latent attention (DeepSeek's MLA) hands over one key head per query head, though the module may still carry
    a group size; the repeat follows the shapes."""
    rows = TreeRows([3, 2], [2, 1, 1, 2], k=2, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 11, 8, generator=g) for _ in range(3))
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    out, _ = _tree_attention(rows, module, q, k, v)
    # pair 0: prompt positions 0-2, answers at 5-6 and 7; pair 1: prompt 3-4, answers 8 and 9-10
    for seq in ([0, 1, 2, 5, 6], [0, 1, 2, 7], [3, 4, 8], [3, 4, 9, 10]):
        idx = torch.tensor(seq)
        alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx],
                                                                 is_causal=True)
        torch.testing.assert_close(out[0, idx], alone[0].transpose(0, 1), rtol=1e-5, atol=1e-6)


def _mpt():
    import transformers as t

    torch.manual_seed(0)
    cfg = t.MptConfig(vocab_size=300, d_model=32, n_heads=4, n_layers=2, max_seq_len=128, pad_token_id=0,
                      attn_config={"alibi": True})
    m = t.MptForCausalLM(cfg).float()
    with torch.no_grad():  # weights under which a short probe's shift stays within the check's tolerance
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.train()


def _gpt_neo(window: int = 16):
    import transformers as t

    torch.manual_seed(0)
    cfg = t.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, window_size=window,
                         attention_types=[[["global", "local"], 1]], max_position_embeddings=128, pad_token_id=0,
                         embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)
    return t.GPTNeoForCausalLM(cfg).float().train()


@pytest.mark.parametrize("make", [_mpt, _gpt_neo], ids=["mpt", "gpt-neo"])
def test_keys_placed_by_cache_slot_or_a_local_window_keep_every_layout_exact(make, caplog, monkeypatch):
    """MPT builds ALiBi from cache slots, so right-padded prompts shift every answer's distances, and GPT-Neo's
    local layers take a window from `window_size`: both shared prompts in padded calls with wrong log-probs
    (8.5e-2 and 3.3e-2 nats), while the route's probe ran its two pairs in calls of their own length."""
    m = make()
    first = batch_of([(8, 3, 3), (8, 2, 4), (8, 3, 2), (8, 4, 3)])  # equal prompts: the route's probe passed
    later = batch_of([(90, 2, 3), (96, 3, 2), (93, 2, 2), (99, 3, 3), (91, 2, 2), (97, 3, 2), (94, 2, 2),
                      (100, 2, 2)], seed=5)  # long unequal prompts and short answers: shared in padded calls
    for batch in (first, later):
        plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
        with torch.no_grad():  # as a reference model runs them
            torch.testing.assert_close(answer_logps(m, batch).logps, plain[0], rtol=1e-5, atol=1e-5)
        assert_close(logps_and_grads(m, lambda: answer_logps(m, batch)), plain)
