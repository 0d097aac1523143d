"""Tokenised items as a few flat arrays: how they travel back from worker processes and how they sit on disk.

    ids      int32 [sum of lengths]  every item's sequences, one after another
    lengths  int64 [n, 3]            pairs: prompt, chosen, rejected; SFT: prompt, answer, mask (-1: no mask)
    flags    uint8 [n, 3]            pairs: which of prompt, chosen, rejected were cut; SFT: truncated, 0, 0
    index    int64 [n]               dataset positions

`unpack(pack(items, kind), kind)` gives back items equal to `items`.
"""

from __future__ import annotations

from itertools import chain

import numpy as np

from .records import PreferencePair
from .tokenize import TokenizedExample, TokenizedPair

ARRAYS = ("ids", "lengths", "flags", "index")


def kind_of(records) -> str:
    """"pairs" for preference pairs, "sft" for SFT examples (what the records tokenise into)."""
    return "pairs" if records and isinstance(records[0], PreferencePair) else "sft"


def _parts(item, kind: str):
    if kind == "pairs":
        return (item.prompt_ids, item.chosen_ids, item.rejected_ids), item.cut
    mask = item.answer_mask
    return (item.prompt_ids, item.answer_ids, mask or []), (item.truncated, False, False)


def pack(items, kind: str) -> dict[str, np.ndarray]:
    n = len(items)
    lengths = np.zeros((n, 3), dtype=np.int64)
    flags = np.zeros((n, 3), dtype=np.uint8)
    index = np.fromiter((it.index for it in items), dtype=np.int64, count=n)
    seqs = []
    for row, item in enumerate(items):
        parts, cut = _parts(item, kind)
        lengths[row] = [len(p) for p in parts]
        flags[row] = cut
        seqs.extend(parts)
        if kind == "sft" and item.answer_mask is None:
            lengths[row, 2] = -1
    ids = np.fromiter(chain.from_iterable(seqs), dtype=np.int32, count=int(np.clip(lengths, 0, None).sum()))
    return {"ids": ids, "lengths": lengths, "flags": flags, "index": index}


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in ARRAYS}


def unpack(arrays: dict[str, np.ndarray], kind: str) -> list:
    ids = arrays["ids"].tolist()
    out, at = [], 0
    for (a, b, c), flags, index in zip(arrays["lengths"].tolist(), arrays["flags"].tolist(),
                                       arrays["index"].tolist()):
        prompt, second = ids[at:at + a], ids[at + a:at + a + b]
        at += a + b
        third = ids[at:at + c] if c >= 0 else None
        at += max(c, 0)
        if kind == "pairs":
            out.append(TokenizedPair(prompt, second, third, any(flags), index, tuple(bool(f) for f in flags)))
        else:
            out.append(TokenizedExample(prompt, second, bool(flags[0]), index, third))
    return out
