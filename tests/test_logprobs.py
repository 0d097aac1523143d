"""Every fast log-prob path against the plain computation: a whole-model forward of each `prompt + answer`."""

from __future__ import annotations

import itertools
import os
import logging

import pytest
import torch
import torch.nn.functional as F

from tinylm import make_tokenizer
from oracle import full_logits_logps
from preftune.logps import answer, layouts, planner
from preftune.data.batching import collate
from preftune.data.records import PreferencePair
from preftune.data.tokenize import TokenizedPair, tokenize_all
from preftune.demo.base import tiny_llama
from preftune.logps.answer import answer_logps
from preftune.logps.layouts import _shared_layout as shared_layout
from preftune.logps.parts import Head
from preftune.logps.layouts import plain_logps, shared_prefix_logps
from preftune.logps.planner import plan_groups, plan_layout
from preftune.logps.projection import token_logps

VOCAB = 97
# (prompt, chosen, rejected) lengths: prompts of very different lengths, answers of one token, chosen longer and
# shorter than rejected.
SHAPES = [(3, 1, 7), (17, 5, 1), (1, 2, 2), (9, 9, 3), (2, 1, 1)]


def model(seed: int = 0):
    return tiny_llama(VOCAB, hidden=32, layers=2, heads=4, pad_id=0, seed=seed).float().train()


def pairs(shapes, seed: int = 1) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r), index=i) for i, (p, c, r) in enumerate(shapes)]


def logps_and_grads(m, fn):
    """Log-probs, and parameter gradients of a weighted sum of them (weights differ per row, some negative)."""
    m.zero_grad(set_to_none=True)
    out = fn().logps
    weights = torch.linspace(-1.0, 2.0, out.numel())
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def assert_close(fast, plain):
    out, grads = fast
    ref_out, ref_grads = plain
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        # Relative to the parameter's largest gradient; the floor covers gradients that are zero in exact
        # arithmetic (a one-token prompt and answer give the queries no gradient) but round-off noise in float32.
        scale = ref_grads[name].abs().max()
        assert (g - ref_grads[name]).abs().max() <= 1e-4 * scale + 1e-8, name


@pytest.mark.parametrize("layout,trim_padding,chunk_size",
                         list(itertools.product([shared_prefix_logps, plain_logps], [True, False], [3, 1024])))
def test_fast_paths_equal_the_whole_model_forward(layout, trim_padding, chunk_size):
    m = model()
    batch = collate(pairs(SHAPES), pad_id=0)
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    fast = logps_and_grads(m, lambda: layout(m, batch, chunk_size=chunk_size, trim_padding=trim_padding))
    assert_close(fast, plain)


@pytest.mark.parametrize("call_cost,prompt,expected", [(0, 4, "shared"), (32, 40, "shared"), (32, 2, "plain"),
                                                       (10_000, 40, "plain")])
def test_the_cheaper_layout_is_taken_and_gives_the_same_numbers(monkeypatch, call_cost, prompt, expected,
                                                                padded_layouts):
    # Shared: each prompt once + 3 calls; plain: each prompt twice in 1 call. Long prompts and cheap calls favour
    # sharing; short prompts or dear calls (a GPU's launches) favour one plain batch.
    monkeypatch.setitem(planner.CALL_COST_TOKENS, "cpu", call_cost)
    m = model()
    batch = collate(pairs([(prompt, 3, 5), (prompt + 1, 4, 2)]), pad_id=0)
    taken = []
    for name in ("shared_prefix_logps", "plain_logps"):
        real = getattr(answer, name)
        monkeypatch.setattr(answer, name, lambda *a, _real=real, _name=name, **k: taken.append(_name) or _real(*a, **k))
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    fast = logps_and_grads(m, lambda: answer_logps(m, batch, prefix_sharing=True))
    assert_close(fast, plain)
    assert taken == [f"{expected}_prefix_logps" if expected == "shared" else "plain_logps"]
    shared_cost = plan_layout(batch, shared=True, trim_padding=True)[1]
    plain_cost = plan_layout(batch, shared=False, trim_padding=True)[1]
    assert (shared_cost <= plain_cost) == (expected == "shared")


def test_prefix_sharing_off_never_shares(monkeypatch, sharing_is_cheap):
    monkeypatch.setattr(answer, "shared_prefix_logps", lambda *a, **k: pytest.fail("shared layout used"))
    m = model()
    batch = collate(pairs(SHAPES), pad_id=0)
    with torch.no_grad():
        answer_logps(m, batch, prefix_sharing=False)


@pytest.mark.parametrize("shapes", [[(4, 3, 5)], [(1, 1, 1)], [(6, 1, 1), (6, 1, 1)]])
def test_small_batches_and_one_token_answers(shapes):
    m = model()
    batch = collate(pairs(shapes), pad_id=0)
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    fast = logps_and_grads(m, lambda: answer_logps(m, batch, chunk_size=3))
    assert_close(fast, plain)


def test_sft_rows_equal_the_whole_model_forward():
    from preftune.data.tokenize import TokenizedExample

    m = model()
    items = [TokenizedExample(list(range(5, 5 + p)), list(range(40, 40 + a)), index=i)
             for i, (p, a) in enumerate([(1, 4), (8, 1), (3, 3)])]
    batch = collate(items, pad_id=0)
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    fast = logps_and_grads(m, lambda: answer_logps(m, batch, chunk_size=2))
    assert_close(fast, plain)


def test_no_grad_paths_agree_too():
    m = model().eval()
    batch = collate(pairs(SHAPES), pad_id=0)
    with torch.no_grad():
        plain = full_logits_logps(m, batch).logps
    with torch.inference_mode():
        fast = answer_logps(m, batch, chunk_size=4).logps
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def head_of(linear: torch.nn.Linear) -> Head:
    """`Head` of just enough of a causal LM: `linear` as its output projection."""

    class _Model:
        config = type("C", (), {})()

        def get_output_embeddings(self):
            return linear

    return Head(_Model())


def counted_products(monkeypatch) -> list[int]:
    """The rows of each vocabulary product the fused projection runs from now on, in order."""
    from preftune.logps import projection

    products = []
    real = projection._chunk_logits
    monkeypatch.setattr(projection, "_chunk_logits", lambda h, w: products.append(h.shape[0]) or real(h, w))
    return products


def test_fused_projection_equals_autograd_log_softmax():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    weights = torch.randn(11)


    fast = token_logps(head_of(head), hidden, targets, chunk_size=3)
    g_fast = torch.autograd.grad((fast * weights).sum(), [hidden, head.weight])
    plain = F.log_softmax(hidden @ head.weight.t(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    g_plain = torch.autograd.grad((plain * weights).sum(), [hidden, head.weight])
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_projection_in_the_reused_buffer_gives_the_same_bits():
    """Inside `reused_logits_buffer` every chunk's logits go to one buffer (the reference's inference-mode
    forward first, then the policy's forward and backward); the results are those of fresh tensors."""
    from preftune.logps.projection import reused_logits_buffer

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 50, (11,))


    def step():
        with torch.inference_mode():
            ref = token_logps(head_of(head), hidden.detach()[:5], targets[:5], chunk_size=4)
        out = token_logps(head_of(head), hidden, targets, chunk_size=3)
        return [ref, out.detach(), *torch.autograd.grad(out.sum(), [hidden, head.weight])]

    fresh = step()
    with reused_logits_buffer():
        reused = step()
    for a, b in zip(fresh, reused):
        assert torch.equal(a, b)


def test_one_chunk_backward_reuses_the_forward_log_probs_while_nothing_overwrote_them(monkeypatch):
    """A one-chunk policy forward in the reused buffer leaves its log-probs there; backward exponentiates them
    instead of a second product. Its gradients equal autograd through the plain log-softmax to rounding, and
    when another projection wrote the buffer in between, backward recomputes and gives the fresh bits."""
    from preftune.logps import projection

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    weights = torch.randn(11)


    products = counted_products(monkeypatch)

    def grads(out):
        return [out.detach(), *torch.autograd.grad((out * weights).sum(), [hidden, head.weight])]

    logits = hidden @ head.weight.t()
    plain = grads(logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1))
    fresh = grads(token_logps(head_of(head), hidden, targets, chunk_size=16))
    assert products == [11, 11]

    products.clear()
    with projection.reused_logits_buffer():
        kept = grads(token_logps(head_of(head), hidden, targets, chunk_size=16))
    assert products == [11]  # no product in backward
    for a, b in zip(kept, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    products.clear()
    with projection.reused_logits_buffer():
        out = token_logps(head_of(head), hidden, targets, chunk_size=16)
        with torch.no_grad():
            token_logps(head_of(head), hidden[:4], targets[:4], chunk_size=16)  # overwrites the buffer
        overwritten = grads(out)
    assert products == [11, 4, 11]
    for a, b in zip(overwritten, fresh):
        assert torch.equal(a, b)

    with projection.reused_logits_buffer():  # backward after the step's buffer is gone recomputes too
        out = token_logps(head_of(head), hidden, targets, chunk_size=16)
    for a, b in zip(grads(out), fresh):
        assert torch.equal(a, b)


def test_left_padding_tokenizer_changes_nothing():
    tok = make_tokenizer()
    records = [PreferencePair("the capital of france is", " paris .", " rome", None, "r1"),
               PreferencePair("cats", " chase mice . the sky is blue", " dogs", None, "r2")]
    right, _ = tokenize_all(tok, records, max_length=64)
    tok.padding_side = "left"
    left, _ = tokenize_all(tok, records, max_length=64)
    b_right, b_left = collate(right, tok.pad_token_id), collate(left, tok.pad_token_id)
    for name in ("prompt_ids", "prompt_lens", "answer_ids", "answer_lens"):
        assert torch.equal(getattr(b_right, name), getattr(b_left, name))
    m = tiny_llama(len(tok), hidden=32, layers=2, heads=4, pad_id=tok.pad_token_id, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(answer_logps(m, b_left).logps, full_logits_logps(m, b_right).logps,
                                   rtol=1e-5, atol=1e-5)


def test_a_model_without_a_reusable_cache_falls_back_with_one_warning(monkeypatch, caplog, sharing_is_cheap,
                                                                     padded_layouts):
    def no_cache(*args, **kwargs):
        raise TypeError("no cache here")

    monkeypatch.setattr(layouts, "_pinned_cache", no_cache)
    monkeypatch.setattr(answer, "_WARNED", set())
    m = model()
    batch = collate(pairs(SHAPES), pad_id=0)
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    with caplog.at_level(logging.WARNING, logger="preftune.logps.answer"):
        first = logps_and_grads(m, lambda: answer_logps(m, batch, prefix_sharing=True))
        second = logps_and_grads(m, lambda: answer_logps(m, batch, prefix_sharing=True))
    assert_close(first, plain)
    assert_close(second, plain)
    warnings = [r for r in caplog.records if "plain path" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch, caplog, reentrant, sharing_is_cheap,
                                                         padded_layouts):
    monkeypatch.setattr(answer, "_WARNED", set())
    m = model()
    batch = collate(pairs(SHAPES), pad_id=0)
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    m.train()
    shared_calls = []

    def counted(*args):
        out = shared_layout(*args)
        if torch.is_grad_enabled():  # not the first call's check of the layouts (route.py), which runs without
            shared_calls.append(1)
        return out

    monkeypatch.setattr(layouts, "_shared_layout", counted)
    with caplog.at_level(logging.WARNING, logger="preftune.logps.answer"):
        fast = logps_and_grads(m, lambda: answer_logps(m, batch, prefix_sharing=True, chunk_size=3))
    assert_close(fast, plain)
    fell_back = [r for r in caplog.records if "reentrant" in r.getMessage()]
    # Non-reentrant checkpointing keeps the prompt's cache in the graph: the answers share it. The reentrant
    # variant would cut it, so that model falls back to the plain layout, with a warning.
    assert bool(shared_calls) != reentrant
    assert bool(fell_back) == reentrant
    # Without gradients nothing is replayed, so the prompt cache is shared either way (and exact).
    with torch.no_grad():
        torch.testing.assert_close(answer_logps(m, batch).logps, plain[0], rtol=1e-5, atol=1e-5)


def test_plan_groups_finds_the_cheapest_contiguous_cut():
    widths = [(3, 1), (4, 9), (4, 2), (9, 1), (30, 5), (31, 40), (80, 2)]
    call = 10

    def cost(group):  # items x (longest of each block, summed) + one call
        return len(group) * sum(max(widths[i][d] for i in group) for d in range(2)) + call

    groups = plan_groups(widths, call_cost=call)
    best = min(sum(cost(list(range(a, b))) for a, b in zip((0,) + cuts, cuts + (len(widths),)))
               for n in range(len(widths)) for cuts in itertools.combinations(range(1, len(widths)), n))
    assert sum(cost(g) for g in groups) == best
    assert [i for g in groups for i in g] == list(range(len(widths)))
    assert plan_groups(widths, call_cost=1e9) == [list(range(len(widths)))]  # dear calls: one padded batch


# A few Anthropic-HH-style dialogues: the prompt is the dialogue up to the last "\n\nAssistant:".
HH = [
    ("\n\nHuman: How do I boil an egg?\n\nAssistant:", " Put it in boiling water for nine minutes.",
     " I don't know."),
    ("\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And Italy?\n\nAssistant:",
     " Rome is the capital of Italy.", " Milan, I think, but I'm not sure about that one."),
    ("\n\nHuman: tell me a joke\n\nAssistant:", " Why did the chicken cross the road?", " No."),
]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_text_tokenisation_matches_trl_and_a_direct_forward():
    """TRL tokenises prompt+answer+EOS text together and splits where it diverges from the tokenised prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator([p + c + r for p, c, r in HH] * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    records = [PreferencePair(p, c, r, None, f"hh{i}") for i, (p, c, r) in enumerate(HH)]
    items, _ = tokenize_all(tok, records, max_length=512)
    m = tiny_llama(len(tok), hidden=32, layers=2, heads=4, pad_id=tok.pad_token_id, seed=0).eval()
    ours = answer_logps(m, collate(items, tok.pad_token_id)).logps.detach()
    for i, (prompt, chosen, rejected) in enumerate(HH):
        prompt_ids = tok(prompt)["input_ids"]
        full = [tok(prompt + a + tok.eos_token)["input_ids"] for a in (chosen, rejected)]
        cut = min(_common_prefix(prompt_ids, f) for f in full)
        assert items[i].prompt_ids == prompt_ids[:cut]
        assert items[i].chosen_ids == full[0][cut:]
        assert items[i].rejected_ids == full[1][cut:]
        for j, ids in enumerate(full):  # summed log-probs of the answer tokens in one plain forward
            with torch.no_grad():
                logits = m(input_ids=torch.tensor([ids])).logits[0]
            direct = F.log_softmax(logits[cut - 1:-1], -1).gather(-1, torch.tensor(ids[cut:])[:, None]).sum()
            torch.testing.assert_close(ours[2 * i + j], direct, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("PREFTUNE_SLOW_TESTS"), reason="torch.compile takes a minute on a CPU; "
                                                                      "set PREFTUNE_SLOW_TESTS=1 to run it")
def test_compiled_decoder_gives_the_same_numbers():
    from preftune.training.setup import _compile_body

    m = model()
    batch = collate(pairs(SHAPES), pad_id=0)
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    _compile_body(m)
    for sharing in (False, True):  # --compile takes the plain layout; the shared one still gives the same numbers
        assert_close(logps_and_grads(m, lambda: answer_logps(m, batch, chunk_size=3, prefix_sharing=sharing)), plain)


def test_plain_layout_padded_to_a_width_multiple_gives_the_same_numbers():
    from preftune.logps.layouts import plain_logps
    from preftune.logps.parts import WIDTH_MULTIPLE, body_of

    m = model()
    batch = collate(pairs(SHAPES), pad_id=0)
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    widths = []
    body = body_of(m)
    hook = body.register_forward_pre_hook(lambda mod, args, kw: widths.append(kw["inputs_embeds"].shape[1]),
                                          with_kwargs=True)
    setattr(body, WIDTH_MULTIPLE, 8)  # what --compile sets
    assert_close(logps_and_grads(m, lambda: plain_logps(m, batch, chunk_size=3)), plain)
    hook.remove()
    assert widths and all(w % 8 == 0 for w in widths)


def test_plan_groups_keeps_every_group_inside_the_span():
    widths = [(3, 1, 2), (4, 9, 1), (10, 2, 2), (12, 1, 4)]  # each fits a span of 16 alone
    groups = plan_groups(widths, call_cost=1e9, max_span=16)
    assert groups == [[0, 1], [2, 3]]  # [0..3] would be 12 + 9; [1, 2] would be 10 + 9
    assert plan_groups(widths, call_cost=1e9) == [[0, 1, 2, 3]]
