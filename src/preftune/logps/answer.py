"""`answer_logps`: summed log-probs of every answer in a batch, by the fastest layout the model allows.

Under data parallelism the computation must be one module's forward (DDP and FSDP2 hook a module's forward);
`LogpsForward` is that module, and dist/logp_module.py wraps it.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from ..data.batching import PromptAnswerBatch
from .layouts import AnswerLogps, plain_logps, shared_prefix_logps, skips_grad
from .limits import Limits, exact_parts, limits_of, row_parts
from .packed import packed_logps, packs
from .parts import LMWrapper, attention_backends, checkpointing, compute_precision, unwrap
from .planner import plan_layout
from .route import FALLBACK, route_of
from .router import RouterLogits
from .whole import whole_logps

log = logging.getLogger(__name__)

_WARNED: set[str] = set()
_SAID: set[tuple[str, str]] = set()


def answer_logps(model, batch: PromptAnswerBatch, *, prefix_sharing: bool = True, chunk_size: int = 1024,
                 trim_padding: bool = True, router_aux: bool = False, uniform_calls: bool = False,
                 packing: bool = True) -> AnswerLogps:
    """Summed log-probs of every answer in `batch` under `model`; prefix sharing when the model allows it.

    `trim_padding` runs the batch as sub-batches of similar length (same numbers, less padding computed).
    `packing` (with sharing and trimming) lets a CPU model run the batch as one row without padding (packed.py).
    `router_aux` (a mixture-of-experts model) also returns the router load-balancing loss of the batch's
    sequences `prompt + answer` (router.py), in `aux_loss`.
    A model that cannot continue answers from a prompt cache falls back to the plain layout, with one warning.
    `model` may also be the module form below (sharded by FSDP, its forward is what gathers the weights; its own
    `packing` holds).
    `uniform_calls`: take the layout `prefix_sharing` names whatever the planner's cost says (see LogpsForward).
    """
    if isinstance(model, LogpsForward):
        return AnswerLogps(*model(batch, prefix_sharing=prefix_sharing, chunk_size=chunk_size,
                                  trim_padding=trim_padding, router_aux=router_aux))
    with compute_precision(model), attention_backends(batch.answer_ids.device):
        router = RouterLogits() if router_aux else None
        out = _answer_logps(model, batch, prefix_sharing=prefix_sharing, chunk_size=chunk_size,
                            trim_padding=trim_padding, router=router, uniform_calls=uniform_calls,
                            packing=packing)
        if router is not None:
            out.aux_loss = router.loss(model)
        return out


def _answer_logps(model, batch: PromptAnswerBatch, *, prefix_sharing: bool, chunk_size: int,
                  trim_padding: bool, router: RouterLogits | None, uniform_calls: bool = False,
                  packing: bool = True) -> AnswerLogps:
    if not uniform_calls:  # FSDP's ranks must make the same calls: a probe of each rank's own batch would not
        route = route_of(model, batch, share=prefix_sharing, packing=packing and trim_padding)
        if route.whole:
            return whole_logps(model, batch, router)
        prefix_sharing = prefix_sharing and route.takes("prefix-shared")
        packing = packing and route.takes("packed")
    limits = limits_of(model)
    parts = exact_parts(batch, limits)
    if len(parts) == 1 and parts[0].answer_rows is None:
        return _layout_logps(model, batch, limits, share=prefix_sharing and parts[0].shareable,
                             chunk_size=chunk_size, trim_padding=trim_padding, router=router,
                             uniform_calls=uniform_calls, packing=packing)
    return _by_parts(batch, parts, lambda part: _layout_logps(
        model, part.batch, limits, share=prefix_sharing and part.shareable, chunk_size=chunk_size,
        trim_padding=trim_padding, router=router, uniform_calls=uniform_calls, packing=packing))


def _by_parts(batch: PromptAnswerBatch, parts, run) -> AnswerLogps:
    """`run(part)` on each part in turn, its log-probs put back at the part's answer rows of `batch`."""
    logps = None
    for part in parts:
        out = run(part).logps
        if logps is None:
            logps = out.new_zeros(batch.answer_ids.shape[0])
        logps = logps.index_copy(0, part.answer_rows, out)
    return AnswerLogps(logps, batch.answer_lens)


def _layout_logps(model, batch: PromptAnswerBatch, limits: Limits, *, share: bool, chunk_size: int,
                  trim_padding: bool, router: RouterLogits | None, uniform_calls: bool = False,
                  packing: bool = True) -> AnswerLogps:
    name = type(unwrap(model)).__name__
    key = f"{name}/checkpointing" if checkpointing(model) else name
    if (packing and share and trim_padding and not uniform_calls and f"{key}/packed" not in _WARNED
            and packs(model)):
        # One call on real tokens only: no padding, and no planner needed (see packed.py).
        out = _attempt(lambda: _packed(model, batch, chunk_size, router), name, "packed", limits, router,
                       f"{key}/packed", *FALLBACK["packed"])
        if out is not None:
            return out
    plain_groups = None
    if share and batch.k > 1:
        # Both layouts give the same numbers; the planner's cost says which is cheaper for this batch on this device.
        shared_groups, shared_cost = plan_layout(batch, shared=True, trim_padding=trim_padding, max_span=limits.window)
        plain_groups, plain_cost = plan_layout(batch, shared=False, trim_padding=trim_padding)
        if key not in _WARNED and (uniform_calls or shared_cost <= plain_cost):
            out = _attempt(lambda: shared_prefix_logps(model, batch, chunk_size=chunk_size, trim_padding=trim_padding,
                                                       max_span=limits.window, groups=shared_groups, router=router),
                           name, "prefix-shared", limits, router, key, *FALLBACK["prefix-shared"])
            if out is not None:
                return out
    _say_once(name, "plain", limits)
    return plain_logps(model, batch, chunk_size=chunk_size, trim_padding=trim_padding, groups=plain_groups,
                       router=router)


def _attempt(run, name: str, layout: str, limits: Limits, router: RouterLogits | None, warned: str,
             cannot: str, instead: str) -> AnswerLogps | None:
    """`run()`, logged once as `layout`; or None, with one warning, where the model cannot take that layout.
    Then `warned` is remembered (the layout is not tried again for this model class) and the router logits the
    attempt gathered are dropped: the next layout gathers them again."""
    gathered = len(router.parts) if router is not None else 0
    try:
        out = run()
    except (TypeError, ValueError, NotImplementedError, AttributeError) as exc:
        if router is not None:
            del router.parts[gathered:]
        _WARNED.add(warned)
        log.warning("%s %s (%s); %s", name, cannot, exc, instead)
        return None
    _say_once(name, layout, limits)
    return out


def _packed(model, batch: PromptAnswerBatch, chunk_size: int, router: RouterLogits | None) -> AnswerLogps:
    """The packed layout; slots that skip autograd (KTO's KL answers) in a call of their own without it, their
    prompts computed again there (a forward without autograd costs a third of one with it)."""
    if not skips_grad(batch, router):
        return packed_logps(model, batch, chunk_size=chunk_size, router=router)
    def run(part):
        with torch.no_grad() if part.batch.no_grad_slots else nullcontext():
            return packed_logps(model, part.batch, chunk_size=chunk_size, router=router)

    rows = torch.arange(batch.answer_ids.shape[0], device=batch.answer_ids.device)
    return _by_parts(batch, reversed(row_parts(batch, rows)), run)  # without autograd first: see layouts._project


def _say_once(name: str, layout: str, limits: Limits) -> None:
    """Log, once per model class and layout, which layout its rows take and why."""
    if (name, layout) in _SAID:
        return
    _SAID.add((name, layout))
    why = limits.describe()
    log.info("%s: %s layout%s", name, layout, f" for some rows ({why})" if why else "")


class LogpsForward(LMWrapper):
    """Module form of `answer_logps`, so data-parallel wrappers see the whole computation as one forward.

    `uniform_calls`: every rank must make the same sequence of decoder calls (FSDP gathers each layer's weights
    in a collective at every call), so the batch runs as one group in the layout the flag names, never split by
    the planner, whose choices depend on each rank's own lengths.
    """

    def __init__(self, model, prefix_sharing: bool, chunk_size: int, trim_padding: bool = True,
                 uniform_calls: bool = False, packing: bool = True):
        super().__init__(model)
        self.prefix_sharing = prefix_sharing
        self.chunk_size = chunk_size
        self.trim_padding = trim_padding and not uniform_calls
        self.uniform_calls = uniform_calls
        self.packing = packing

    def forward(self, batch: PromptAnswerBatch, prefix_sharing: bool | None = None, chunk_size: int | None = None,
                trim_padding: bool | None = None, router_aux: bool = False):
        trim = self.trim_padding if trim_padding is None else trim_padding
        out = answer_logps(self.model, batch,
                           prefix_sharing=self.prefix_sharing if prefix_sharing is None else prefix_sharing,
                           chunk_size=chunk_size or self.chunk_size, trim_padding=trim and not self.uniform_calls,
                           router_aux=router_aux, uniform_calls=self.uniform_calls, packing=self.packing)
        return (out.logps, out.lengths) if out.aux_loss is None else (out.logps, out.lengths, out.aux_loss)
