"""Each layout a model may take, checked once against the model's own forward, before its first batch counts.

The layouts never call the model's forward: they run its decoder body on embeddings and project with its output
matrix (parts.py). That is the forward of every family the tests cover, but not of all: a head may transform the
hidden states before projecting (BERT-style heads), a body may look up per-layer inputs from token ids (Gemma 3n)
or mix neighbouring tokens outside attention (convolutions, which a packed row would let cross from one pair to
the next), an attention may take a bias of its own through its mask argument. Such a model would train on wrong
log-probs without a word. So the first time a model meets `answer_logps`, a few tokens of that batch's first two
pairs run through each layout it may take and through its own forward (`whole.py`, no tricks), without gradients
and without dropout:
- the plain layout off: the decoder body and head alone do not give the model's numbers; every batch of this
  model then runs through `whole.py` (its own forward, row by row), with one warning;
- the prefix-shared or packed layout off: that layout is not taken for this model, with one warning.
Agreement means a difference within `TOLERANCE` of the log-prob sum's size (float32; half precision compares
more loosely, so only gross differences show there).
"""

from __future__ import annotations

import logging
import weakref
import torch

from ..data.batching import PromptAnswerBatch
from .layouts import plain_logps, shared_prefix_logps
from .limits import limits_of
from .packed import packed_logps, packs
from .parts import compute_precision, unwrap, width_multiple
from .whole import whole_logps

# The layouts' other fallback warnings are logged under answer.py's name: one logger to filter or capture.
log = logging.getLogger("preftune.logps.answer")

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative to 1 + |sum|; other dtypes: HALF
HALF = 5e-2
PROBE_PROMPT, PROBE_ANSWER = 8, 6  # tokens kept of each probe pair's prompt and answers
# layout -> (what the model cannot do, what runs instead), for the warning when a layout is not taken
FALLBACK = {"packed": ("cannot run answers packed in one row", "using the padded layouts"),
            "prefix-shared": ("cannot continue answers from a shared prompt cache", "using the plain path")}


class Route:
    """What was found for one model object: `layouts` maps each layout checked so far to whether it agrees."""

    def __init__(self):
        self.layouts: dict[str, bool] = {}

    @property
    def whole(self) -> bool:
        """Whether batches take the model's own forward (its body and head alone differ from it)."""
        return self.layouts.get("plain") is False

    def takes(self, layout: str) -> bool:
        return self.layouts.get(layout, True)


_ROUTES: "weakref.WeakKeyDictionary[torch.nn.Module, Route]" = weakref.WeakKeyDictionary()


def route_of(model, batch: PromptAnswerBatch, *, share: bool, packing: bool) -> Route:
    """The route of `model`: each layout it may take for `batch` is checked the first time, on a probe of `batch`,
    and remembered per model object."""
    hf = unwrap(model)
    route = _ROUTES.get(hf)
    if route is None:
        route = _ROUTES[hf] = Route()
    wanted = ["plain"]
    if share and batch.k > 1:
        wanted.append("prefix-shared")
    if packing and share and packs(model):
        wanted.append("packed")
    if "prefix-shared" in wanted and "prefix-shared" not in route.layouts and _bias_by_slot(hf):
        route.layouts["prefix-shared"] = False  # a probe's few padded slots shift its bias too little to show
        cannot, instead = FALLBACK["prefix-shared"]
        log.warning("%s %s (its ALiBi bias counts cache slots, which a padded shared prompt shifts); %s",
                    type(hf).__name__, cannot, instead)
    todo = [layout for layout in wanted if layout not in route.layouts]
    if todo and not route.whole and not _compiled(model):
        _check(model, _probe(batch), todo, route)
    return route


def _bias_by_slot(hf) -> bool:
    """Whether the model builds its attention bias from cache-slot indices rather than positions (MPT's ALiBi),
    so that the padding of a shared prompt cache shifts every answer's distances to its prompt."""
    return getattr(getattr(hf, "config", None), "model_type", "") == "mpt"  # its ALiBi, whatever attn_config says


def _compiled(model) -> bool:
    """Whether the decoder's layers are compiled (setup._compile_body): a probe of other shapes and modes would
    compile them again, so such a model is not checked."""
    try:
        return width_multiple(model) != 1
    except TypeError:  # no decoder body found: the check will say so
        return False


def _probe(batch: PromptAnswerBatch) -> PromptAnswerBatch:
    """The first two pairs of `batch`, their prompts and answers cut short (a pair's own length each, so the
    probe rows differ in length)."""
    n, k = min(2, batch.size), batch.k
    p_host, a_host = batch.lengths()
    p = [min(p_host[i], PROBE_PROMPT - i) for i in range(n)]
    a = [min(a_host[j], PROBE_ANSWER - j % k) for j in range(n * k)]
    mask = None if batch.answer_mask is None else batch.answer_mask[: n * k, : max(a)]
    labels = None if batch.labels is None else batch.labels[:n]
    dev = batch.prompt_ids.device
    return PromptAnswerBatch(batch.prompt_ids[:n, : max(p)], torch.tensor(p, device=dev),
                             batch.answer_ids[: n * k, : max(a)], torch.tensor(a, device=dev), k, batch.index[:n],
                             mask, (p, a), labels)


def _differs(fast: torch.Tensor, whole: torch.Tensor, tol: float) -> float:
    """The largest difference between the two where it exceeds `tol` of the size; else 0."""
    gap = (fast.double() - whole.double()).abs()
    over = gap > tol * (1 + whole.double().abs())
    return float(gap.max()) if bool(over.any()) else 0.0


def _check(model, probe: PromptAnswerBatch, layouts: list[str], route: Route) -> None:
    hf = unwrap(model)
    name = type(hf).__name__
    if min(probe.lengths()[0]) == 0:
        return  # nothing to compare on; the layouts refuse such rows themselves
    dtype = getattr(hf, "preftune_compute_dtype", None) or next(hf.parameters()).dtype
    tol = TOLERANCE.get(dtype, HALF)
    window = limits_of(model).window
    runs = {"plain": lambda: plain_logps(model, probe, chunk_size=1024),
            # Both probe pairs in one call, their prompts padded: what the planner does with pairs of unequal
            # length, and what a model that places its keys by cache slot (MPT's ALiBi) gets wrong.
            "prefix-shared": lambda: shared_prefix_logps(model, probe, chunk_size=1024, max_span=window,
                                                         groups=[list(range(probe.size))]),
            "packed": lambda: packed_logps(model, probe, chunk_size=1024)}
    was_training = hf.training
    hf.eval()
    try:
        with torch.no_grad(), compute_precision(model):
            try:
                whole = whole_logps(model, probe).logps
            except Exception as exc:  # noqa: BLE001 - the model's own forward fails on its own; nothing to check
                log.debug("%s: its layouts not checked (its own forward raised %s)", name, exc)
                route.layouts.update(dict.fromkeys(layouts, True))
                return
            for layout in layouts:
                try:
                    gap, why = _differs(runs[layout]().logps, whole, tol), ""
                except Exception as exc:  # noqa: BLE001 - any failure on a few tokens: the layout is not taken
                    gap, why = float("inf"), f"{type(exc).__name__}: {exc}"
                route.layouts[layout] = not gap
                if not gap:
                    continue
                said = why or f"its log-probs differ from its own forward's by up to {gap:.3g} on a few tokens"
                if layout == "plain":
                    log.warning("%s: its own forward computes what its decoder body and output head alone do not "
                                "(%s); every batch runs through its whole forward, one answer at a time (slower, "
                                "full logits)", name, said)
                    return
                cannot, instead = FALLBACK[layout]
                log.warning("%s %s (%s); %s", name, cannot, said, instead)
    finally:
        hf.train(was_training)
