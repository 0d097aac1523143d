"""Where reference log-probs come from: an explicit strategy, chosen once when the run starts.

- `FrozenReference`: a separate frozen model (the starting model or `--ref-model`);
- `AdaptersOffReference`: the policy itself with its LoRA adapters switched off (no second copy);
- `StartAdaptersReference`: the policy itself with its adapters as they started (a peft model that comes with
  trained adapters, such as an SFT LoRA run: switching them off would give the base model, not the start);
- `CachedReference`: log-probs computed once per dataset and read back by dataset position.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from ..data.batching import PromptAnswerBatch
from ..logps.answer import answer_logps


class FrozenReference:
    # A separate frozen model only ever runs without gradients, so inference mode's cheaper bookkeeping is safe.
    _no_grad = staticmethod(torch.inference_mode)

    def __init__(self, model, *, prefix_sharing: bool = True, chunk_size: int = 1024, trim_padding: bool = True,
                 packing: bool = True):
        self.model = model
        self.prefix_sharing = prefix_sharing
        self.chunk_size = chunk_size
        self.trim_padding = trim_padding
        self.packing = packing

    def _context(self):
        return nullcontext()

    def logps(self, batch: PromptAnswerBatch) -> torch.Tensor:
        """[B*k] summed answer log-probs under the reference."""
        with self._no_grad(), self._context():
            out = answer_logps(self.model, batch, prefix_sharing=self.prefix_sharing, chunk_size=self.chunk_size,
                               trim_padding=self.trim_padding, packing=self.packing).logps
        return out.clone()  # an ordinary tensor: losses may save it for backward, which inference tensors forbid


class AdaptersOffReference(FrozenReference):
    """The policy network with its adapters disabled: the frozen base weights are the reference."""

    # The policy also trains: a tensor it caches in inference mode could not be used by autograd later.
    _no_grad = staticmethod(torch.no_grad)

    def _context(self):
        from ..logps.parts import unwrap

        return unwrap(self.model).disable_adapter()

    def logps(self, batch: PromptAnswerBatch) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout in the reference
        try:
            return super().logps(batch)
        finally:
            self.model.train(was_training)


class StartAdaptersReference(AdaptersOffReference):
    """The policy network with its trainable weights (the adapters) as they were when the run started: those
    values are kept aside and copied in for each reference pass, then the current ones copied back. The frozen
    base is shared, so the only copy is of the adapters. Taken before a resume loads a checkpoint, so the
    reference stays the run's start. Between micro-batches no autograd graph holds the adapters, so copying
    into them there is safe."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.start = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    @contextmanager
    def _context(self):
        now = [p.detach().clone() for p, _ in self.start]
        with torch.no_grad():
            for p, start in self.start:
                p.copy_(start)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), current in zip(self.start, now):
                    p.copy_(current)


class CachedReference:
    """Reference log-probs looked up by dataset position: `table[index]` holds the k answers' log-probs."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # [N, k] float32

    def logps(self, batch: PromptAnswerBatch) -> torch.Tensor:
        return self.table[batch.index].reshape(-1).to(batch.answer_ids.device)
