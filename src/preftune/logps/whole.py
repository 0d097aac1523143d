"""The last-resort layout: every answer row through the model's own forward, with full logits, one row at a time.

For a model whose own forward computes something its decoder body and output head alone do not (a head with a
transform before its projection, per-layer inputs looked up from token ids, a logit cap under a name this
library does not know): route.py finds such models and sends their batches here. Each row `prompt + answer` is
one unpadded call, as a whole-model forward of that sequence; with gradients on, a row's logits are recomputed
in backward instead of kept, so memory holds one row's [length, vocab] logits at a time.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.batching import PromptAnswerBatch
from .layouts import AnswerLogps, skips_grad
from .parts import unwrap
from .router import RouterLogits


def _row_logp(hf, ids: torch.Tensor, prompt_len: int, mask: torch.Tensor | None, router: RouterLogits | None):
    out = hf(input_ids=ids[None], use_cache=False, **({} if router is None else {"output_router_logits": True}))
    if router is not None:
        router.add(out, torch.ones(1, ids.shape[0], dtype=torch.bool, device=ids.device))
    logits = out.logits[0, prompt_len - 1:-1].float()
    per_token = F.log_softmax(logits, dim=-1).gather(-1, ids[prompt_len:, None]).squeeze(-1)
    if mask is not None:
        per_token = per_token * mask.to(per_token.dtype)
    return per_token.sum()


def whole_logps(model, batch: PromptAnswerBatch, router: RouterLogits | None = None) -> AnswerLogps:
    """Summed answer log-probs from the model's own forward of each `prompt + answer`, row by row."""
    hf = unwrap(model)
    k = batch.k
    p_host, a_host = batch.lengths()
    no_grad_rows = skips_grad(batch, router)
    sums = []
    for j, a in enumerate(a_host):
        p = p_host[j // k]
        if not p:
            raise ValueError("a row has no prompt token to predict its first answer token from")
        ids = torch.cat([batch.prompt_ids[j // k, :p], batch.answer_ids[j, :a]])
        mask = None if batch.answer_mask is None else batch.answer_mask[j, :a]
        frozen = no_grad_rows and j % k in batch.no_grad_slots
        with torch.no_grad() if frozen else nullcontext():
            if torch.is_grad_enabled() and router is None:  # router logits would be gathered twice in a replay
                sums.append(checkpoint(_row_logp, hf, ids, p, mask, None, use_reentrant=False))
            else:
                sums.append(_row_logp(hf, ids, p, mask, router))
    return AnswerLogps(torch.stack(sums), batch.answer_lens)
