"""Batches: padded layout, sub-batches, and the epoch order with and without --group-by-length."""

from __future__ import annotations

import random

import torch

from preftune.data.batching import collate, epoch_order
from preftune.data.tokenize import TokenizedPair


def skewed_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    """Lengths with a long tail, like dialogue data: most prompts short, a few very long."""
    rng = random.Random(seed)

    def ids(mean):
        return [7] * max(1, int(rng.expovariate(1 / mean)))

    return [TokenizedPair(ids(110), ids(45), ids(45), index=i) for i in range(n)]


def padded_tokens(items, batches) -> tuple[int, int]:
    """Tokens one padded batch computes, in the shared layout (prompts to the longest prompt, answers to the
    longest answer) and in the plain layout (every prompt+answer row to the longest row)."""
    shared = plain = 0
    for b in batches:
        batch = collate([items[i] for i in b], pad_id=0)
        shared += batch.prompt_ids.numel() + batch.answer_ids.numel()
        plain += batch.answer_ids.shape[0] * int((batch.prompt_lens.repeat_interleave(2) + batch.answer_lens).max())
    return shared, plain


def test_collate_layout_matches_the_documented_example():
    items = [TokenizedPair([5, 6, 7], [1, 2], [3], index=0), TokenizedPair([8], [4], [9, 9, 9], index=1)]
    b = collate(items, pad_id=0)
    assert b.prompt_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b.answer_ids.tolist() == [[1, 2, 0], [3, 0, 0], [4, 0, 0], [9, 9, 9]]
    assert b.prompt_lens.tolist() == [3, 1] and b.answer_lens.tolist() == [2, 1, 1, 3]
    sub = b.select([1])
    assert sub.prompt_ids.tolist() == [[8]] and sub.answer_ids.tolist() == [[4, 0, 0], [9, 9, 9]]
    assert sub.index.tolist() == [1]
    assert b.tokens() == 3 + 1 + 2 + 1 + 1 + 3
    # Lengths travel as host lists beside the tensors (a GPU batch is planned without reading the device).
    moved = b.to("cpu")
    assert moved.host_lens == ([3, 1], [2, 1, 1, 3])
    assert sub.lengths() == ([1], [1, 3]) == (sub.prompt_lens.tolist(), sub.answer_lens.tolist())


def test_group_by_length_is_deterministic_and_covers_every_example_once():
    items = skewed_pairs(203)
    for group in (False, True):
        a = epoch_order(items, batch_size=8, seed=3, epoch=0, group_by_length=group)
        assert a == epoch_order(items, batch_size=8, seed=3, epoch=0, group_by_length=group)
        assert a != epoch_order(items, batch_size=8, seed=4, epoch=0, group_by_length=group)
        assert a != epoch_order(items, batch_size=8, seed=3, epoch=1, group_by_length=group)
        flat = [i for b in a for i in b]
        assert all(len(b) == 8 for b in a) and len(a) == 203 // 8
        assert len(set(flat)) == len(flat)  # nobody twice; only the last incomplete batch (3 examples) left out
    exact = skewed_pairs(200)
    flat = sorted(i for b in epoch_order(exact, batch_size=8, seed=0, epoch=2, group_by_length=True) for i in b)
    assert flat == list(range(200))


def test_group_by_length_cuts_padding():
    items = skewed_pairs(800)
    random_order = padded_tokens(items, epoch_order(items, batch_size=8, seed=0, epoch=0, group_by_length=False))
    grouped = padded_tokens(items, epoch_order(items, batch_size=8, seed=0, epoch=0, group_by_length=True))
    # Sorting by prompt+answer length lines up whole rows (plain layout) well, prompt and answer blocks less so.
    assert grouped[1] < 0.5 * random_order[1]
    assert grouped[0] < 0.8 * random_order[0]
