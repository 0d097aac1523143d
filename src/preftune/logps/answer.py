"""`answer_logps`: summed log-probs of every answer in a batch, by the fastest layout the model allows.

Under data parallelism the computation must be one module's forward (DDP and FSDP2 hook a module's forward);
`LogpsForward` is that module, and dist/logp_module.py wraps it.
"""

from __future__ import annotations

import logging

from ..data.batching import PromptAnswerBatch
from .layouts import AnswerLogps, plain_logps, shared_prefix_logps
from .parts import LMWrapper, attention_backends, checkpointing, compute_precision, unwrap
from .planner import plan_layout

log = logging.getLogger(__name__)

_WARNED: set[str] = set()


def answer_logps(model, batch: PromptAnswerBatch, *, prefix_sharing: bool = True, chunk_size: int = 1024,
                 trim_padding: bool = True) -> AnswerLogps:
    """Summed log-probs of every answer in `batch` under `model`; prefix sharing when the model allows it.

    `trim_padding` runs the batch as sub-batches of similar length (same numbers, less padding computed).
    A model that cannot continue answers from a prompt cache falls back to the plain layout, with one warning.
    `model` may also be the module form below (sharded by FSDP, its forward is what gathers the weights).
    """
    if isinstance(model, LogpsForward):
        logps, lengths = model(batch, prefix_sharing=prefix_sharing, chunk_size=chunk_size, trim_padding=trim_padding)
        return AnswerLogps(logps, lengths)
    with compute_precision(model), attention_backends(batch.answer_ids.device):
        return _answer_logps(model, batch, prefix_sharing=prefix_sharing, chunk_size=chunk_size,
                             trim_padding=trim_padding)


def _answer_logps(model, batch: PromptAnswerBatch, *, prefix_sharing: bool, chunk_size: int,
                  trim_padding: bool) -> AnswerLogps:
    plain_groups, plain_cost = plan_layout(batch, shared=False, trim_padding=trim_padding)
    if prefix_sharing and batch.k > 1:
        # Both layouts give the same numbers; the planner's cost says which is cheaper for this batch on this device.
        shared_groups, shared_cost = plan_layout(batch, shared=True, trim_padding=trim_padding)
        name = type(unwrap(model)).__name__
        key = f"{name}/checkpointing" if checkpointing(model) else name
        if key not in _WARNED and shared_cost <= plain_cost:
            try:
                return shared_prefix_logps(model, batch, chunk_size=chunk_size, trim_padding=trim_padding,
                                           groups=shared_groups)
            except (TypeError, ValueError, NotImplementedError, AttributeError) as exc:
                _WARNED.add(key)
                log.warning("%s cannot continue answers from a shared prompt cache (%s); using the plain path",
                            name, exc)
    return plain_logps(model, batch, chunk_size=chunk_size, trim_padding=trim_padding, groups=plain_groups)


class LogpsForward(LMWrapper):
    """Module form of `answer_logps`, so data-parallel wrappers see the whole computation as one forward."""

    def __init__(self, model, prefix_sharing: bool, chunk_size: int, trim_padding: bool = True):
        super().__init__(model)
        self.prefix_sharing = prefix_sharing
        self.chunk_size = chunk_size
        self.trim_padding = trim_padding

    def forward(self, batch: PromptAnswerBatch, prefix_sharing: bool | None = None, chunk_size: int | None = None,
                trim_padding: bool | None = None):
        out = answer_logps(self.model, batch,
                           prefix_sharing=self.prefix_sharing if prefix_sharing is None else prefix_sharing,
                           chunk_size=chunk_size or self.chunk_size,
                           trim_padding=self.trim_padding if trim_padding is None else trim_padding)
        return out.logps, out.lengths

