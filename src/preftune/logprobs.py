"""Summed log-probabilities of answer tokens: the one helper behind SFT, DPO, eval and the reference cache.

Two layouts compute the same numbers:
- plain: every answer row is its own sequence `prompt + answer` (the prompt is computed once per answer);
- prefix-shared: the prompts run once, and all k answers of a prompt continue from its key/value cache.
Either way only the hidden states that predict answer tokens are projected to the vocabulary, a chunk of
`chunk_size` tokens at a time, recomputed in backward: no `[rows, length, vocab]` tensor ever exists.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data.batching import PromptAnswerBatch

log = logging.getLogger(__name__)


@dataclass
class AnswerLogps:
    logps: torch.Tensor    # [B*k] summed log-prob of each answer
    lengths: torch.Tensor  # [B*k] answer tokens counted

    def split(self, k: int = 2) -> tuple[torch.Tensor, ...]:
        """Per-answer-slot views: for pairs, (chosen [B], rejected [B])."""
        return tuple(self.logps[i::k] for i in range(k))


# --------------------------------------------------------------------------------------------- model pieces
def _unwrap(model):
    """The Hugging Face model under DDP/compile wrappers and the log-prob module itself."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod") or isinstance(model, _Forward):
        if isinstance(model, _Forward):
            model = model.model
        else:
            model = getattr(model, "module", None) or model._orig_mod
    return model


class Head:
    """The output projection of a causal LM, with the logit transforms some architectures apply after it."""

    def __init__(self, model):
        hf = _unwrap(model)
        self.linear = hf.get_output_embeddings()
        cfg = hf.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.scale = getattr(cfg, "logit_scale", None)            # Cohere multiplies
        self.divide = getattr(cfg, "logits_scaling", None)        # Granite divides

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.linear(hidden).float()
        if self.scale:
            out = out * self.scale
        if self.divide:
            out = out / self.divide
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def body_of(model):
    """The decoder stack (everything before the output projection)."""
    hf = _unwrap(model)
    body = hf.get_decoder() if hasattr(hf, "get_decoder") else None
    if body is None:
        body = getattr(hf, hf.base_model_prefix, None)
    if body is None:
        raise TypeError(f"{type(hf).__name__}: cannot find the decoder body")
    return body


def _cache_kwarg(body) -> str:
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# --------------------------------------------------------------------------------------------- the projection
def _token_logps(head: Head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head.logits(hidden)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(head: Head, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log p(target) for each row of `hidden` [N, H] -> [N], projecting `chunk_size` rows at a time.

    With gradients on, each chunk's logits are dropped after forward and recomputed in backward.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    parts = []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or head.linear.weight.requires_grad):
            parts.append(checkpoint(_token_logps, head, h, t, use_reentrant=False))
        else:
            parts.append(_token_logps(head, h, t))
    return torch.cat(parts)


def _answer_mask(batch: PromptAnswerBatch) -> torch.Tensor:
    width = batch.answer_ids.shape[1]
    return torch.arange(width, device=batch.answer_ids.device)[None, :] < batch.answer_lens[:, None]


def _sum_rows(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    return torch.zeros(mask.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)


# --------------------------------------------------------------------------------------------- the two layouts
def plain_logps(model, batch: PromptAnswerBatch, *, chunk_size: int = 1024) -> AnswerLogps:
    """Each answer row as its own right-padded sequence `prompt + answer`."""
    k, dev = batch.k, batch.answer_ids.device
    p_lens = batch.prompt_lens.repeat_interleave(k)
    a_lens = batch.answer_lens
    total = p_lens + a_lens
    width = int(total.max())
    pos = torch.arange(width, device=dev)[None, :]
    prompts = batch.prompt_ids.repeat_interleave(k, dim=0)
    in_prompt = pos < p_lens[:, None]
    # Column c of the answer block sits at sequence position p_len + c.
    a_col = (pos - p_lens[:, None]).clamp(0, batch.answer_ids.shape[1] - 1)
    ids = torch.where(in_prompt, prompts.gather(1, pos.clamp(max=prompts.shape[1] - 1).expand_as(in_prompt)),
                      batch.answer_ids.gather(1, a_col))
    attn = pos < total[:, None]
    ids = ids.masked_fill(~attn, 0)
    hidden = body_of(model)(input_ids=ids, attention_mask=attn.long(), use_cache=False).last_hidden_state
    amask = _answer_mask(batch)
    # The answer token at column c is predicted by the hidden state at position p_len + c - 1.
    src = (p_lens[:, None] - 1 + torch.arange(amask.shape[1], device=dev)[None, :])[amask]
    rows = torch.arange(amask.shape[0], device=dev)[:, None].expand_as(amask)[amask]
    per_token = token_logps(Head(model), hidden[rows, src], batch.answer_ids[amask], chunk_size)
    return AnswerLogps(_sum_rows(per_token, amask), a_lens)


def shared_prefix_logps(model, batch: PromptAnswerBatch, *, chunk_size: int = 1024) -> AnswerLogps:
    """Prompts once; the k answers of each prompt continue from its key/value cache.

    The prompt block stays right-padded in the cache; the attention mask hides the padding and explicit
    position ids continue each row at its true prompt length, so every answer sees exactly its prompt.
    """
    body, k, dev = body_of(model), batch.k, batch.answer_ids.device
    cache_name = _cache_kwarg(body)
    p_width = batch.prompt_ids.shape[1]
    p_mask = torch.arange(p_width, device=dev)[None, :] < batch.prompt_lens[:, None]
    out = body(input_ids=batch.prompt_ids, attention_mask=p_mask.long(), use_cache=True)
    cache = getattr(out, cache_name, None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise TypeError("the model returned no reusable key/value cache")
    if k > 1:
        cache.batch_repeat_interleave(k)
    amask = _answer_mask(batch)
    a_width = amask.shape[1]
    positions = batch.prompt_lens.repeat_interleave(k)[:, None] + torch.arange(a_width, device=dev)[None, :]
    attn = torch.cat([p_mask.repeat_interleave(k, dim=0), amask], dim=1).long()
    ans = body(input_ids=batch.answer_ids, attention_mask=attn, position_ids=positions,
               use_cache=True, **{cache_name: cache}).last_hidden_state
    # Predictor of answer column 0 is the last prompt state; of column c>0, the answer state at c-1.
    first = out.last_hidden_state[torch.arange(batch.size, device=dev), batch.prompt_lens - 1]
    predictors = torch.cat([first.repeat_interleave(k, dim=0)[:, None], ans[:, :-1]], dim=1)
    per_token = token_logps(Head(model), predictors[amask], batch.answer_ids[amask], chunk_size)
    return AnswerLogps(_sum_rows(per_token, amask), batch.answer_lens)


_WARNED: set[str] = set()


def answer_logps(model, batch: PromptAnswerBatch, *, prefix_sharing: bool = True,
                 chunk_size: int = 1024) -> AnswerLogps:
    """Summed log-probs of every answer in `batch` under `model`; prefix sharing when the model allows it.

    `model` may also be the module form below (sharded by FSDP, its forward is what gathers the weights).
    """
    if isinstance(model, _Forward):
        logps, lengths = model(batch, prefix_sharing=prefix_sharing, chunk_size=chunk_size)
        return AnswerLogps(logps, lengths)
    if prefix_sharing and batch.k > 1:
        name = type(_unwrap(model)).__name__
        if name not in _WARNED:
            try:
                return shared_prefix_logps(model, batch, chunk_size=chunk_size)
            except (TypeError, ValueError, NotImplementedError, AttributeError) as exc:
                _WARNED.add(name)
                log.warning("%s cannot continue answers from a shared prompt cache (%s); using the plain path",
                            name, exc)
    return plain_logps(model, batch, chunk_size=chunk_size)


def full_logits_logps(model, batch: PromptAnswerBatch) -> AnswerLogps:
    """The reference computation: a whole-model forward of each `prompt + answer`, full logits, no tricks.

    Used by tests to check the fast paths; memory grows as rows x length x vocab.
    """
    k = batch.k
    sums = []
    for j in range(batch.answer_ids.shape[0]):
        i = j // k
        p = batch.prompt_ids[i, : batch.prompt_lens[i]]
        a = batch.answer_ids[j, : batch.answer_lens[j]]
        ids = torch.cat([p, a])[None]
        logits = _unwrap(model)(input_ids=ids).logits[0].float()
        lp = F.log_softmax(logits[len(p) - 1: -1], dim=-1).gather(-1, a[:, None]).sum()
        sums.append(lp)
    return AnswerLogps(torch.stack(sums), batch.answer_lens)


class _Forward(torch.nn.Module):
    """Module form of `answer_logps`, so data-parallel wrappers see the whole computation as one forward."""

    def __init__(self, model, prefix_sharing: bool, chunk_size: int):
        super().__init__()
        self.model = model
        self.prefix_sharing = prefix_sharing
        self.chunk_size = chunk_size

    def forward(self, batch: PromptAnswerBatch, prefix_sharing: bool | None = None, chunk_size: int | None = None):
        out = answer_logps(self.model, batch,
                           prefix_sharing=self.prefix_sharing if prefix_sharing is None else prefix_sharing,
                           chunk_size=chunk_size or self.chunk_size)
        return out.logps, out.lengths


def sharded_logps_module(model, *, prefix_sharing: bool = True, chunk_size: int = 1024) -> _Forward:
    """A frozen model's log-prob module sharded with FSDP2 (for a reference); `answer_logps` accepts it."""
    from .parallel import shard

    return shard(_Forward(model, prefix_sharing, chunk_size), model, frozen=True)


class AnswerLogpModule:
    """The policy's answer log-probs as the training loop calls them, data-parallel under torchrun.

    Under torchrun the module is wrapped in DDP (every rank holds all weights), or with `fsdp` sharded by
    FSDP2 (each rank holds 1/world of them; see parallel.py).
    """

    def __init__(self, model, *, prefix_sharing: bool = True, chunk_size: int = 1024, env=None, fsdp: bool = False):
        self.inner = _Forward(model, prefix_sharing, chunk_size)
        self.runner = self.inner
        self.sharded = bool(fsdp and env is not None and env.enabled)
        if self.sharded:
            from .parallel import shard

            shard(self.inner, model)
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
        logps, lengths = self.runner(batch)
        return AnswerLogps(logps, lengths)

    def sync(self, last: bool):
        """Gradient all-reduce (DDP) or reduce-scatter (FSDP2) only on the last micro-batch of a step."""
        from contextlib import contextmanager, nullcontext

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
