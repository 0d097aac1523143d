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


def batch_of(shapes, seed: int = 1):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return collate([TokenizedPair(ids(p), ids(c), ids(r), index=i) for i, (p, c, r) in enumerate(shapes)], pad_id=0)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(answer, "_WARNED", set())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_equals_the_whole_model_forward(family, caplog):
    m = tiny(family, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if family == "gpt2" else tiny(family)
    batch = batch_of(SHAPES)
    plain = logps_and_grads(m, lambda: full_logits_logps(m, batch))
    with caplog.at_level(logging.WARNING, logger="preftune.logps.answer"):
        for sharing in (True, False):
            for trim in (True, False):
                fast = logps_and_grads(m, lambda: answer_logps(m, batch, prefix_sharing=sharing, trim_padding=trim,
                                                               chunk_size=5))
                assert_close(fast, plain)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fast = logps_and_grads(m, lambda: answer_logps(m, batch, prefix_sharing=True))
        assert_close(fast, plain)
    # No family falls back: every one continues answers from a shared prompt cache, checkpointed or not.
    assert not [r.getMessage() for r in caplog.records if "plain path" in r.getMessage()]


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
def test_sliding_models_share_inside_the_window_and_run_plain_past_it(family, monkeypatch):
    m = tiny(family).eval()
    assert limits_of(m).window == WINDOW
    ran = {"shared": [], "plain": []}
    shared, plain = answer.shared_prefix_logps, answer.plain_logps
    monkeypatch.setattr(answer, "shared_prefix_logps", lambda mm, b, **kw: ran["shared"].append(b.size) or shared(mm, b, **kw))
    monkeypatch.setattr(answer, "plain_logps", lambda mm, b, **kw: ran["plain"].append(b.size) or plain(mm, b, **kw))
    with torch.no_grad():
        answer_logps(m, batch_of(INSIDE))
        assert ran == {"shared": [len(INSIDE)], "plain": []}
        answer_logps(m, batch_of(SHAPES))
    past = len(SHAPES) - len(INSIDE)
    assert past > 0 and ran == {"shared": [len(INSIDE)] * 2, "plain": [past]}
