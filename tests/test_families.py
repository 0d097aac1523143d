"""Every layout against a whole-model forward of each row alone, on tiny models of 22 Hugging Face families.

The pairs run on both sides of a sliding window and of longrope's switch length (both 16 tokens in families.py),
one pair ends exactly on it, and one has an answer on each side.
"""

from __future__ import annotations

import logging

import pytest
import torch

from families import FAMILIES, ORIGINAL_MAX, VOCAB, WINDOW, tiny
from oracle import full_logits_logps
from preftune.data.batching import collate
from preftune.data.tokenize import TokenizedPair
from preftune.logps import answer, layouts
from preftune.logps.answer import answer_logps
from preftune.logps.limits import limits_of
from test_logprobs import assert_close, logps_and_grads

# Each family's shared layout is under test: let the planner take it whenever the model allows it.
pytestmark = pytest.mark.usefixtures("sharing_is_cheap")

# (prompt, chosen, rejected): ends at 10, 22, 3, 16 (on the edge), 15 and 20 (one answer on each side)
SHAPES = [(3, 1, 7), (17, 5, 1), (2, 1, 1), (10, 6, 2), (12, 3, 8)]
INSIDE = [s for s in SHAPES if s[0] + max(s[1:]) <= WINDOW]
assert WINDOW == ORIGINAL_MAX


def id_source(seed: int):
    """n -> n random token ids, from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    return lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()


def batch_of(shapes, seed: int = 1):
    ids = id_source(seed)
    return collate([TokenizedPair(ids(p), ids(c), ids(r), index=i) for i, (p, c, r) in enumerate(shapes)], pad_id=0)


def spy_on(monkeypatch, *names) -> dict[str, list[int]]:
    """The batch sizes each of these layout functions of `answer` (`packed_logps`, ...) is called with."""
    ran = {name: [] for name in names}
    for name in names:
        real = getattr(answer, name)
        monkeypatch.setattr(answer, name, lambda mm, b, _real=real, _name=name, **kw:
                            ran[_name].append(b.size) or _real(mm, b, **kw))
    return ran


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(answer, "_WARNED", set())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_equals_the_whole_model_forward(family, caplog, monkeypatch):
    m = tiny(family, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if family == "gpt2" else tiny(family)
    batch = batch_of(SHAPES)
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    packs = answer.packs
    ran = spy_on(monkeypatch, "packed_logps")["packed_logps"]
    with caplog.at_level(logging.WARNING, logger="preftune.logps.answer"):
        for packing in (True, False):  # packed where the model's attention takes it; then the padded layouts
            monkeypatch.setattr(answer, "packs", packs if packing else lambda model: False)
            for sharing in (True, False):
                for trim in (True, False):
                    fast = logps_and_grads(m, lambda: answer_logps(m, batch, prefix_sharing=sharing,
                                                                   trim_padding=trim, chunk_size=5))
                    assert_close(fast, plain)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for packing in (True, False):
            monkeypatch.setattr(answer, "packs", packs if packing else lambda model: False)
            fast = logps_and_grads(m, lambda: answer_logps(m, batch, prefix_sharing=True))
            assert_close(fast, plain)
    # No family falls back: every one continues answers from a shared prompt cache, checkpointed or not, and
    # every one with "sdpa" attention through Hugging Face's attention table runs packed.
    assert not [r.getMessage() for r in caplog.records if "plain path" in r.getMessage() or "packed" in r.getMessage()]
    assert bool(ran) == packs(m)
    # These four have eager attention or their own attention code in transformers 5.24; a later release may
    # bring them to the shared attention table, and then they pack too.
    assert packs(m) or family in ("gemma2", "bloom", "stablelm", "falcon-alibi")


def test_the_longrope_pairs_do_cross_the_switch():
    """Without the cut, one padded call takes one factor set for all: the matrix above would see it."""
    m = tiny("phi3-longrope").eval()
    batch = batch_of(SHAPES)
    with torch.no_grad():
        whole = layouts.plain_logps(m, batch, trim_padding=False).logps
        ref = full_logits_logps(m, batch).logps
    assert limits_of(m).rope_switch == ORIGINAL_MAX
    assert (whole - ref).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["mistral", "gemma2", "cohere2", "starcoder2", "qwen2-window", "phi3-window"])
def test_sliding_models_share_inside_the_window_and_run_plain_past_it(family, monkeypatch, padded_layouts):
    m = tiny(family).eval()
    assert limits_of(m).window == WINDOW
    ran = spy_on(monkeypatch, "shared_prefix_logps", "plain_logps")
    with torch.no_grad():
        answer_logps(m, batch_of(INSIDE))
        assert ran == {"shared_prefix_logps": [len(INSIDE)], "plain_logps": []}
        answer_logps(m, batch_of(SHAPES))
    past = len(SHAPES) - len(INSIDE)
    assert past > 0 and ran == {"shared_prefix_logps": [len(INSIDE)] * 2, "plain_logps": [past]}


@pytest.mark.parametrize("family", ["mistral", "cohere2", "starcoder2", "qwen2-window", "phi3-window"])
def test_sliding_models_pack_inside_the_window_and_run_plain_past_it(family, monkeypatch):
    """Packed attention runs per pair without the window, which is exact while a pair fits it."""
    m = tiny(family).eval()
    ran = spy_on(monkeypatch, "packed_logps", "plain_logps")
    batch = batch_of(SHAPES)
    with torch.no_grad():
        out = answer_logps(m, batch).logps
        torch.testing.assert_close(out, full_logits_logps(m, batch).logps, rtol=1e-5, atol=1e-5)
    past = len(SHAPES) - len(INSIDE)
    assert ran == {"packed_logps": [len(INSIDE)], "plain_logps": [past]}


@pytest.mark.parametrize("family", ["phi3-longrope", "mistral"])
def test_conversation_masks_hold_when_rows_are_cut_at_the_switch_or_window(family):
    """SFT conversations of several assistant turns carry an answer mask (0 on the user turns between them). Rows
    past longrope's switch run as answer rows of their own, and rows past a window run apart: the mask must
    travel with them, or the user turns would enter the loss."""
    from preftune.data.tokenize import TokenizedExample

    m = tiny(family).eval()
    ids = id_source(3)

    # prompt + answer ends at 9 (inside), 25 and 30 (past 16); the masks zero a middle stretch
    items = [TokenizedExample(ids(3), ids(6), index=0, answer_mask=[1, 1, 0, 0, 1, 1]),
             TokenizedExample(ids(5), ids(20), index=1, answer_mask=[1] * 6 + [0] * 8 + [1] * 6),
             TokenizedExample(ids(10), ids(20), index=2, answer_mask=[1] * 4 + [0] * 10 + [1] * 6)]
    batch = collate(items, pad_id=0)
    with torch.no_grad():
        ref = full_logits_logps(m, batch).logps
        unmasked = full_logits_logps(m, collate([TokenizedExample(i.prompt_ids, i.answer_ids, index=i.index)
                                                  for i in items], pad_id=0)).logps
        assert (ref - unmasked).abs().min() > 1e-3  # the mask matters in every row
        for sharing in (True, False):
            torch.testing.assert_close(answer_logps(m, batch, prefix_sharing=sharing).logps, ref,
                                       rtol=1e-5, atol=1e-5)


def test_kto_kl_rows_past_the_longrope_switch_still_run_without_autograd():
    """KTO's KL answers (slot 1) past the switch run as k=1 parts of their own, marked to skip autograd: same
    log-probs and gradients as a pass that tracks them, and no gradient through them."""
    import dataclasses

    from preftune.data.tokenize import TokenizedUnpaired

    m = tiny("phi3-longrope")
    ids = id_source(4)

    # prompt + answer / prompt + KL answer: 8 / 24, 22 / 9, 13 / 18 (both sides of 16)
    items = [TokenizedUnpaired(ids(4), ids(4), ids(20), True, index=0),
             TokenizedUnpaired(ids(6), ids(16), ids(3), False, index=1),
             TokenizedUnpaired(ids(9), ids(4), ids(9), True, index=2)]
    batch = collate(items, pad_id=0)
    assert batch.no_grad_slots == (1,)
    params = [p for p in m.parameters() if p.requires_grad]
    runs = []
    for b in (batch, dataclasses.replace(batch, no_grad_slots=())):
        out = answer_logps(m, b)
        runs.append((out.logps.detach(), torch.autograd.grad(out.logps[0::2].sum(), params, allow_unused=True)))
        kl_grads = torch.autograd.grad(answer_logps(m, b).logps[1::2].sum(), params, allow_unused=True)
        assert any(x is not None and x.abs().sum() > 0 for x in kl_grads) == (b is not batch)
    (skipped, g_skipped), (tracked, g_tracked) = runs
    torch.testing.assert_close(skipped, tracked, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_skipped, g_tracked):
        if a is None or b is None:
            assert (a is None or not a.abs().sum()) and (b is None or not b.abs().sum())
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
