"""Which prompt rows of a batch run together: groups of similar length, each padded only to its own longest row.

A batch of mixed lengths padded to its longest row computes mostly padding; one forward per row pays a call's
overhead per row. The plan weighs one against the other with a cost in tokens of work.
"""

from __future__ import annotations

from ..data.batching import PromptAnswerBatch

# What one extra forward call costs, in tokens of work: Python and kernel-launch overhead. On a CPU a forward is
# cheap to start, so a batch splits into many exact-length groups; on a GPU launches are dear and groups stay big.
CALL_COST_TOKENS = {"cpu": 32, "cuda": 2048}
DEFAULT_CALL_COST = 512


def plan_groups(widths: list[tuple[int, ...]], *, rows_per_item: int = 1, call_cost: float = 0.0,
                max_span: int | None = None) -> list[list[int]]:
    """Cut items 0..n-1 (in length order) into contiguous groups of least total cost, by dynamic programming.

    A group of g items costs `g * rows_per_item * sum_d max(width[d] over the group) + call_cost`: each item has
    one width per padded block (prompt, each answer slot) and a block is padded to its longest member. Sorted
    items make contiguous groups the good ones; the plan weighs padding against one more forward call. O(n^2 d).
    With `max_span`, a group's first block plus its widest other block may not exceed it (each item alone must fit).
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
    return groups[::-1]


def length_groups(batch: PromptAnswerBatch, *, shared: bool, trim_padding: bool,
                  max_span: int | None = None) -> list[list[int]]:
    """Prompt rows of `batch` in groups of similar length, each group padded only to its own longest row.

    `max_span` (shared layout): no group's prompt width plus answer width exceeds it, trimmed or not.

    Cost model, in tokens: shared layout = prompts once + each answer slot to its own width (1 + k forward
    calls); plain layout = every answer row as prompt + answer (one call); a call costs `CALL_COST_TOKENS`.
    """
    b, k = batch.size, batch.k
    fits = max_span is None or int(batch.prompt_lens.max()) + int(batch.answer_lens.max()) <= max_span
    if b == 1 or (not trim_padding and fits):
        return [list(range(b))]
    p = batch.prompt_lens.tolist()
    a = batch.answer_lens.view(b, k).tolist()
    # Untrimmed but over the span: as few groups as fit.
    call = CALL_COST_TOKENS.get(batch.answer_ids.device.type, DEFAULT_CALL_COST) if trim_padding else 1e12
    order = sorted(range(b), key=lambda r: (p[r] + max(a[r]), p[r]))
    if shared:
        groups = plan_groups([(p[r], *a[r]) for r in order], call_cost=call * (1 + k), max_span=max_span)
    else:
        groups = plan_groups([(p[r] + max(a[r]),) for r in order], rows_per_item=k, call_cost=call)
    return [[order[i] for i in g] for g in groups]
