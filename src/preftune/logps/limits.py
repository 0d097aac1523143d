"""Which rows each layout computes exactly, read off a model's config, and the batch cut to match.

Two things make a row's numbers depend on what else runs in the same forward call:

- rope whose frequencies depend on the call's largest position. Longrope (Phi-3 128k, Phi-3.5, Phi-4-mini)
  takes its short factors while the call's longest sequence is at most `original_max_position_embeddings`, its
  long factors past that; dynamic NTK rescales past `max_position_embeddings`, by the exact length. A whole-model
  forward of one row takes the factors of that row's own length, so every call here must hold only rows whose
  lengths take the same factors: pairs whose answers all end before the switch run in any layout; the answers
  of the other pairs run as plain rows, those before and those past the switch in separate calls (dynamic NTK:
  one call per row past the switch, shortest first, since Hugging Face keeps the longest factors it has seen).
- sliding-window attention. The shared layout keeps prompts right-padded in the cache, so a window would be
  measured in cache slots instead of positions; while a group's prompt width plus answer width fits the window,
  no key is outside any query's window and sharing is exact. Pairs that do not fit run plain (right padding keeps
  slots equal to positions, so the plain layout is exact at any length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.batching import PromptAnswerBatch
from .parts import text_config, unwrap


@dataclass(frozen=True)
class Limits:
    rope_switch: int | None = None  # rows of at most this many tokens take the short rope factors
    rope_by_length: bool = False    # past the switch the factors follow the exact length (dynamic NTK)
    window: int | None = None       # the smallest sliding window (tokens), if any layer has one
    rope_kind: str = ""

    def describe(self) -> str:
        """Why a model's rows take the layouts they take, in words for the run's log."""
        parts = []
        if self.window is not None:
            parts.append(f"sliding window {self.window}: pairs whose prompt + answer fit it share the prompt, "
                         f"longer pairs run plain")
        if self.rope_switch is not None:
            parts.append(f"{self.rope_kind} rope switches factors past {self.rope_switch} tokens: pairs that end "
                         f"before share the prompt, the answers of longer pairs run plain, one factor set per call")
        return "; ".join(parts)


def layout_note(model, prefix_sharing: bool, why: str = "--no-prefix-sharing", packing: bool = True) -> str:
    """One line for the run's log: the layout a model's rows take and why (`why`: what switched sharing off;
    `packing`: whether the packed layout may be taken, i.e. padding is trimmed and calls need not be uniform)."""
    from .packed import packs

    name = type(unwrap(model)).__name__
    if not prefix_sharing:
        return f"layout: {name}: plain ({why})"
    why = limits_of(model).describe()
    if packing and packs(model):
        return f"layout: {name}: packed (prompts once, answers after them, one row without padding)" + (
            f"; {why}" if why else "")
    return f"layout: {name}: prefix-shared" + (f"; {why}" if why else "")


def _rope_params(cfg) -> list[dict]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return []
    if any(isinstance(v, dict) for v in params.values()):  # one set per layer type (Gemma 3)
        return [v for v in params.values() if isinstance(v, dict)]
    return [params]


def limits_of(model) -> Limits:
    cfg = text_config(model)
    window = None
    types = getattr(cfg, "layer_types", None)
    if getattr(cfg, "sliding_window", None) and (types is None or "sliding_attention" in types):
        if getattr(cfg, "use_sliding_window", True):  # Qwen2 keeps a window size it does not use unless asked
            window = int(cfg.sliding_window)
    local = getattr(cfg, "attention_layers", None)  # GPT-Neo: "local" layers attend within `window_size`
    if window is None and getattr(cfg, "window_size", None) and isinstance(local, (list, tuple)) and "local" in local:
        window = int(cfg.window_size)
    switch, by_length, kind = None, False, ""
    for p in _rope_params(cfg):
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type == "longrope":
            original = p.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings",
                                                                            None)
            if original:  # without it longrope has one factor set (its length-based factor is fixed)
                switch, kind = int(original), "longrope"
        elif "dynamic" in rope_type:
            # Hugging Face rescales once the call reaches max_position_embeddings (and keeps the factors it grew
            # to until a call is shorter than that), so exact below it.
            switch, by_length, kind = int(cfg.max_position_embeddings) - 1, True, "dynamic NTK"
    return Limits(switch, by_length, window, kind)


@dataclass
class Part:
    """Some answer rows of a batch, as a batch of their own, and whether the shared layout is exact for them."""

    batch: PromptAnswerBatch
    answer_rows: torch.Tensor | None  # [rows of `batch`] answer rows of the whole batch; None: all, in order
    shareable: bool


def _rows_as_batch(batch: PromptAnswerBatch, answer_rows: torch.Tensor, no_grad: bool) -> PromptAnswerBatch:
    """Answer rows as a k=1 batch, each with its own copy of its prompt (trimmed of all-padding columns) and its
    row of the answer mask; `no_grad` when they all belong to `batch.no_grad_slots`."""
    prompts = torch.div(answer_rows, batch.k, rounding_mode="floor")
    p, a = batch.prompt_lens[prompts], batch.answer_lens[answer_rows]
    width = int(a.max())
    mask = None if batch.answer_mask is None else batch.answer_mask[answer_rows, :width]
    return PromptAnswerBatch(batch.prompt_ids[prompts, : int(p.max())], p, batch.answer_ids[answer_rows, :width],
                             a, 1, batch.index[prompts.to(batch.index.device)], mask,
                             no_grad_slots=(0,) if no_grad else ())


def row_parts(batch: PromptAnswerBatch, answer_rows: torch.Tensor) -> list[Part]:
    """`answer_rows` as k=1 parts: the rows of `batch.no_grad_slots` apart, so they still run without autograd."""
    if not batch.no_grad_slots:
        return [Part(_rows_as_batch(batch, answer_rows, False), answer_rows, False)]
    still = batch.in_no_grad_slot(answer_rows)
    return [Part(_rows_as_batch(batch, rows, no_grad), rows, False)
            for rows, no_grad in ((answer_rows[~still], False), (answer_rows[still], True)) if len(rows)]


def exact_parts(batch: PromptAnswerBatch, limits: Limits) -> list[Part]:
    """`batch` cut into parts that a forward call computes exactly (see the module docstring)."""
    k, dev = batch.k, batch.answer_ids.device
    if limits.rope_switch is None and limits.window is None:
        return [Part(batch, None, True)]
    totals = batch.prompt_lens.repeat_interleave(k) + batch.answer_lens          # [B*k]
    pair_end = totals.view(batch.size, k).max(dim=1).values                     # [B]
    fits = torch.ones(batch.size, dtype=torch.bool, device=dev)
    if limits.rope_switch is not None:
        fits &= pair_end <= limits.rope_switch
    shareable = torch.ones_like(fits)
    if limits.window is not None:
        shareable &= pair_end <= limits.window
    parts = []
    for prompts, share in ((fits & shareable, True), (fits & ~shareable, False)):
        idx = prompts.nonzero().squeeze(1)
        if len(idx) == batch.size:
            parts.append(Part(batch, None, share))
        elif len(idx):
            rows = (idx[:, None] * k + torch.arange(k, device=dev)).reshape(-1)
            parts.append(Part(batch.select(idx), rows, share))
    rest = (~fits).repeat_interleave(k)
    if limits.rope_switch is not None and bool(rest.any()):
        parts += [part for rows in switch_calls(totals, rest, limits) for part in row_parts(batch, rows)]
    return parts


def switch_calls(lengths: torch.Tensor, rows: torch.Tensor, limits: Limits) -> list[torch.Tensor]:
    """The indices of `rows` (a mask over `lengths`), grouped into forward calls whose rope factors are each row's
    own: those before the switch together, those past it together, or one at a time, shortest first, where the
    factors follow the exact length (dynamic NTK)."""
    before = (rows & (lengths <= limits.rope_switch)).nonzero().squeeze(1)
    past = (rows & (lengths > limits.rope_switch)).nonzero().squeeze(1)
    past = past[torch.argsort(lengths[past], stable=True)]
    groups = [before] if len(before) else []
    if limits.rope_by_length:
        return groups + [row[None] for row in past]
    return groups + ([past] if len(past) else [])
