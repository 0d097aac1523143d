"""Which prompt rows of a batch run together: groups of similar length, each padded only to its own longest row.

A batch of mixed lengths padded to its longest row computes mostly padding; one forward per row pays a call's
overhead per row. The plan weighs one against the other with a cost in tokens of work, and the same cost picks
the layout: the shared one computes each prompt once but makes 1 + k forward calls per group, the plain one
computes each prompt k times in a single call. (A CPU model whose attention takes the packed layout, packed.py,
pays neither and needs no plan.)
"""

from __future__ import annotations

from ..data.batching import PromptAnswerBatch

# What one extra forward call costs, in tokens of work: Python and kernel-launch overhead. On a CPU a forward is
# cheap to start, so a batch splits into several groups of similar length (on the CPU benchmark's fixture, 2
# threads, a quiet machine: 128 ran its passes 3.6% faster than 32, 64 and 256 in between; after the projection
# changes, 64 ran as fast as 128 and 32 4-10% slower). On a GPU a small model's step is bound by launches and host
# work: on an H100 with a 0.5B model and batches of 8 HH pairs, one padded plain batch ran 38 pairs/s where
# exact-length groups in the shared layout ran 20 (benchmarks/results/gpu-h100/), so a call weighs as much as
# several thousand tokens there.
CALL_COST_TOKENS = {"cpu": 128, "cuda": 8192}
DEFAULT_CALL_COST = 512


def plan_groups(widths: list[tuple[int, ...]], *, rows_per_item: int = 1, call_cost: float = 0.0,
                max_span: int | None = None) -> list[list[int]]:
    """The groups of `plan_groups_and_cost`."""
    return plan_groups_and_cost(widths, rows_per_item=rows_per_item, call_cost=call_cost, max_span=max_span)[0]


def plan_groups_and_cost(widths: list[tuple[int, ...]], *, rows_per_item: int = 1, call_cost: float = 0.0,
                         max_span: int | None = None) -> tuple[list[list[int]], float]:
    """Cut items 0..n-1 (in length order) into contiguous groups of least total cost, by dynamic programming.

    A group of g items costs `g * rows_per_item * sum_d max(width[d] over the group) + call_cost`: each item has
    one width per padded block (prompt, each answer slot) and a block is padded to its longest member. Sorted
    items make contiguous groups the good ones; the plan weighs padding against one more forward call. O(n^2 d).
    With `max_span`, a group's first block plus its widest other block may not exceed it (each item alone must fit).
    Returns (groups, their total cost).
    """
    n = len(widths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        longest = [0] * len(widths[0])
        for i in range(j - 1, -1, -1):
            longest = [max(x, y) for x, y in zip(longest, widths[i])]
            if max_span is not None and i < j - 1 and longest[0] + max(longest[1:], default=0) > max_span:
                break  # a longer group only grows
            c = best[i] + (j - i) * rows_per_item * sum(longest) + call_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(list(range(cut[j], j)))
        j = cut[j]
    return groups[::-1], best[n]


def plan_layout(batch: PromptAnswerBatch, *, shared: bool, trim_padding: bool,
                max_span: int | None = None) -> tuple[list[list[int]], float]:
    """(prompt rows of `batch` in groups of similar length, the plan's cost in tokens) for one layout.

    Cost model, in tokens: shared layout = prompts once + each answer slot to its own width (1 + k forward
    calls); plain layout = every answer row as prompt + answer (one call); a call costs `CALL_COST_TOKENS`.
    Without `trim_padding` the batch is one group, unless `max_span` (shared layout: no group's prompt width plus
    answer width may exceed it) forces as few groups as fit.
    """
    b, k = batch.size, batch.k
    p, flat = batch.lengths()
    a = [flat[r * k:(r + 1) * k] for r in range(b)]
    call = CALL_COST_TOKENS.get(batch.answer_ids.device.type, DEFAULT_CALL_COST)
    order = sorted(range(b), key=lambda r: (p[r] + max(a[r]), p[r]))
    if shared:
        widths, rows_per_item, call, span = [(p[r], *a[r]) for r in order], 1, call * (1 + k), max_span
    else:
        widths, rows_per_item, span = [(p[r] + max(a[r]),) for r in order], k, None
    fits = span is None or max(p) + max(flat) <= span
    if b == 1 or (not trim_padding and fits):
        longest = [max(col) for col in zip(*widths)]
        return [list(range(b))], b * rows_per_item * sum(longest) + call
    groups, cost = plan_groups_and_cost(widths, rows_per_item=rows_per_item, call_cost=call if trim_padding else 1e12,
                                        max_span=span)
    if not trim_padding:  # untrimmed but over the span: as few groups as fit, each costed as the model pays it
        cost = sum(len(g) * rows_per_item * sum(max(widths[i][d] for i in g) for d in range(len(widths[0]))) + call
                   for g in groups)
    return [[order[i] for i in g] for g in groups], cost


def length_groups(batch: PromptAnswerBatch, *, shared: bool, trim_padding: bool,
                  max_span: int | None = None) -> list[list[int]]:
    """Prompt rows of `batch` in groups of similar length, each group padded only to its own longest row."""
    return plan_layout(batch, shared=shared, trim_padding=trim_padding, max_span=max_span)[0]
