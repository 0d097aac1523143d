"""The policy's and a sharded reference's answer log-probs in the data-parallel form the training loop runs.

Under torchrun the log-prob module (`logps.answer.LogpsForward`) is wrapped in DDP (every rank holds all
weights), or with `--fsdp` sharded by FSDP2 (each rank holds 1/world of them; see fsdp.py).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from ..data.batching import PromptAnswerBatch
from ..logps.answer import LogpsForward
from ..logps.layouts import AnswerLogps
from ..reward import RewardForward
from .fsdp import fully_shard_model


def sharded_logps_module(model, *, prefix_sharing: bool = True, chunk_size: int = 1024) -> LogpsForward:
    """A frozen model's log-prob module sharded with FSDP2 (for a reference); `answer_logps` accepts it."""
    return fully_shard_model(LogpsForward(model, prefix_sharing, chunk_size, uniform_calls=True), model, frozen=True)


class AnswerLogpModule:
    """The policy's answer log-probs as the training loop calls them, data-parallel under torchrun."""

    def __init__(self, model, *, prefix_sharing: bool = True, chunk_size: int = 1024, trim_padding: bool = True,
                 env=None, fsdp: bool = False, router_aux: bool = False, packing: bool = True):
        self.router_aux = router_aux  # also return the router load-balancing loss (mixture of experts)
        self.sharded = bool(fsdp and env is not None and env.enabled)
        self.inner = LogpsForward(model, prefix_sharing, chunk_size, trim_padding, uniform_calls=self.sharded,
                                  packing=packing)
        self.runner = self.inner
        if self.sharded:
            fully_shard_model(self.inner, model)
        elif env is not None and env.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [env.local_rank] if next(model.parameters()).is_cuda else None
            self.runner = DistributedDataParallel(self.inner, device_ids=device_ids)

    @property
    def eval_model(self):
        """What no-grad log-probs (evaluation, adapters-off reference) run through: sharded weights must go
        through the FSDP root's forward; otherwise the plain model is enough."""
        return self.inner if self.sharded else self.inner.model

    def __call__(self, batch: PromptAnswerBatch) -> AnswerLogps:
        return AnswerLogps(*self.runner(batch, router_aux=self.router_aux))

    def sync(self, last: bool):
        """Gradient all-reduce (DDP) or reduce-scatter (FSDP2) only on the last micro-batch of a step."""
        if last:
            return nullcontext()
        if self.sharded:
            @contextmanager
            def deferred():
                self.inner.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    self.inner.set_requires_gradient_sync(True)
            return deferred()
        no_sync = getattr(self.runner, "no_sync", None)
        return nullcontext() if no_sync is None else no_sync()


class RewardModule:
    """A reward model's rewards (`reward.batch_rewards`) as the training loop calls them: the interface of
    `AnswerLogpModule`, data-parallel (DDP) under torchrun; no sharding."""

    sharded = False

    def __init__(self, model, *, env=None):
        self.inner = RewardForward(model)
        self.runner = self.inner
        if env is not None and env.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [env.local_rank] if next(model.parameters()).is_cuda else None
            self.runner = DistributedDataParallel(self.inner, device_ids=device_ids)

    @property
    def eval_model(self):
        return self.inner.model

    def __call__(self, batch: PromptAnswerBatch):
        return self.runner(batch)

    def sync(self, last: bool):
        no_sync = getattr(self.runner, "no_sync", None)
        return nullcontext() if last or no_sync is None else no_sync()
