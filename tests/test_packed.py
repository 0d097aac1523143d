"""The packed layout (prompts and answers in one row, attention per pair) against a whole-model forward of each
`prompt + answer` alone, and its fallback where a model's attention does not take it."""

from __future__ import annotations

import logging

import pytest
import torch

from families import VOCAB, tiny
from oracle import full_logits_logps
from preftune.data.batching import PromptAnswerBatch, collate
from preftune.data.tokenize import TokenizedExample, TokenizedPair
from preftune.logps import answer, packed
from preftune.logps.answer import answer_logps
from preftune.logps.packed import TreeRows, packed_logps
from test_families import id_source, spy_on
from test_logprobs import assert_close, logps_and_grads

# (prompt, chosen, rejected): one-token prompts and answers, chosen longer and shorter than rejected
SHAPES = [(3, 1, 7), (9, 5, 1), (1, 2, 2), (6, 6, 3), (2, 1, 1)]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(answer, "_WARNED", set())


def pair_batch(shapes, seed: int = 1):
    ids = id_source(seed)
    return collate([TokenizedPair(ids(p), ids(c), ids(r), index=i) for i, (p, c, r) in enumerate(shapes)], pad_id=0)


def three_answer_batch(seed: int = 2):
    """k = 3 answers per prompt, built directly (no reader gives three yet); one answer of one token."""
    g = torch.Generator().manual_seed(seed)
    p, a = [4, 1, 7], [2, 5, 1, 3, 3, 6, 1, 4, 2]
    return PromptAnswerBatch(torch.randint(3, VOCAB, (3, 7), generator=g), torch.tensor(p),
                             torch.randint(3, VOCAB, (9, 6), generator=g), torch.tensor(a), 3, torch.arange(3))


def masked_sft_batch(seed: int = 3):
    """k = 1 conversations whose answer masks zero the user turns between assistant turns."""
    ids = id_source(seed)
    items = [TokenizedExample(ids(3), ids(6), index=0, answer_mask=[1, 1, 0, 0, 1, 1]),
             TokenizedExample(ids(1), ids(4), index=1),
             TokenizedExample(ids(5), ids(9), index=2, answer_mask=[1] * 3 + [0] * 4 + [1] * 2)]
    return collate(items, pad_id=0)


def test_the_tree_mask_of_two_answers():
    rows = TreeRows([2], [2, 1], 2, torch.device("cpu"))
    # Keys: the prompt's 2 tokens, then answer 0's 2 tokens, then answer 1's token. Each answer token sees the
    # whole prompt and its own answer up to itself, never the other answer.
    expected = torch.tensor([[1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(rows.masks[0], expected)
    assert rows.sizes == [2, 3] and rows.longest == 4


@pytest.mark.parametrize("make", [lambda: pair_batch(SHAPES), lambda: pair_batch([(4, 3, 2)]), three_answer_batch,
                                  masked_sft_batch], ids=["pairs", "one-pair", "three-answers", "masked-sft"])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_packed_equals_the_whole_model_forward(make, chunk_size):
    m = tiny("llama")  # grouped-query attention: 4 query heads share 2 key/value heads
    batch = make()
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    fast = logps_and_grads(m, lambda: packed_logps(m, batch, chunk_size=chunk_size))
    assert_close(fast, plain)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_replay_the_packed_attention(monkeypatch, caplog, reentrant):
    """A checkpointed layer replays its attention in backward with the keyword arguments of its forward, so the
    replay takes the pair structure too (either checkpointing variant: nothing is cached across layers)."""
    m = tiny("qwen3")
    batch = pair_batch(SHAPES)
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ran = spy_on(monkeypatch, "packed_logps")["packed_logps"]
    with caplog.at_level(logging.WARNING, logger="preftune.logps.answer"):
        fast = logps_and_grads(m, lambda: answer_logps(m, batch))
    assert_close(fast, plain)
    assert ran == [len(SHAPES)] and not caplog.records


def test_packing_off_takes_the_padded_layouts(monkeypatch):
    m = tiny("llama")
    batch = pair_batch(SHAPES)
    ran = spy_on(monkeypatch, "packed_logps")["packed_logps"]
    with torch.no_grad():
        off = answer_logps(m, batch, packing=False).logps
        on = answer_logps(m, batch).logps
    assert ran == [len(SHAPES)]
    torch.testing.assert_close(off, on, rtol=1e-5, atol=1e-5)


def test_a_layer_that_drops_the_structure_makes_the_model_fall_back_once(monkeypatch, caplog):
    """A decoder layer that does not pass unknown keyword arguments on to its attention would attend across the
    whole row: the count of attention calls catches it, and the model takes the padded layouts from then on."""
    m = tiny("llama")
    attn = m.model.layers[1].self_attn
    forward = attn.forward
    monkeypatch.setattr(attn, "forward", lambda *a, **kw: forward(*a, **{k: v for k, v in kw.items()
                                                                        if k != packed.KWARG}))
    batch = pair_batch(SHAPES)
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    with caplog.at_level(logging.WARNING, logger="preftune.logps.answer"):
        first = logps_and_grads(m, lambda: answer_logps(m, batch))
        second = logps_and_grads(m, lambda: answer_logps(m, batch))
    assert_close(first, plain)
    assert_close(second, plain)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "1 of its 2 layers" in warnings[0] and "padded layouts" in warnings[0]


def test_attention_it_cannot_compute_is_refused(monkeypatch):
    """Attention that takes a logit cap (Gemma 2's, were it run through "sdpa") is not computed without it."""
    m = tiny("llama").eval()
    attn = m.model.layers[0].self_attn
    forward = attn.forward
    monkeypatch.setattr(attn, "forward", lambda *a, **kw: forward(*a, softcap=50.0, **kw))
    with torch.no_grad(), pytest.raises(NotImplementedError, match="softcap"):
        packed_logps(m, pair_batch(SHAPES))


def test_a_pair_longer_than_the_window_is_refused():
    m = tiny("mistral").eval()  # window 16
    with torch.no_grad(), pytest.raises(ValueError, match="does not fit its sliding window of 16"):
        packed_logps(m, pair_batch([(3, 2, 2), (10, 7, 1)]))


def test_the_stock_attention_is_unchanged_without_the_structure(monkeypatch):
    """Hugging Face's "sdpa" entries delegate to the stock functions: a padded forward gives the same bits."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    m = tiny("llama").eval()
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    packed._install()
    assert AttentionInterface._global_mapping["sdpa"] is packed._attention
    with torch.no_grad():
        delegated = m(input_ids=ids, attention_mask=mask).logits
        monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", packed._STOCK["attention"])
        monkeypatch.setitem(AttentionMaskInterface._global_mapping, "sdpa", packed._STOCK["mask"])
        stock = m(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(delegated, stock)
