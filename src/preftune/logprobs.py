"""Summed log-probabilities of answer tokens: the one helper behind SFT, DPO, eval and the reference cache.

Two layouts compute the same numbers:
- plain: every answer row is its own sequence `prompt + answer` (the prompt is computed once per answer);
- prefix-shared: the prompts run once, and all k answers of a prompt continue from its key/value cache.
Either way only the hidden states that predict answer tokens are projected to the vocabulary, a chunk of
`chunk_size` tokens at a time, recomputed in backward: no `[rows, length, vocab]` tensor ever exists.
A batch runs as sub-batches of similar length (`trim_padding`), so padding costs (almost) no compute.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext
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


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, `chunk` rows at a time, for a plain bias-free projection.

    Forward keeps only the per-row logsumexp; backward recomputes each chunk's logits and turns them into the
    logit gradient in place (softmax, scaled, minus one-hot), so a chunk needs one [chunk, vocab] buffer and no
    zero-filled scatter tensors. Same numbers as autograd through `_token_logps`.
    """

    @staticmethod
    def project(hidden, weight, targets, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(target) [N], logsumexp [N]), float32."""
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).float()
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        return out, lse

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        out, lse = _LinearTokenLogps.project(hidden, weight, targets, chunk)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        # Backward recomputes the logits: it must do so at the precision forward used (mixed precision).
        dev = hidden.device.type
        ctx.amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        amp = ctx.amp
        with torch.autocast(hidden.device.type, dtype=amp, enabled=amp is not None):
            return _LinearTokenLogps._backward(ctx, grad, hidden, weight, targets, lse, amp)

    @staticmethod
    def _backward(ctx, grad, hidden, weight, targets, lse, amp):
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[s:s + ctx.chunk], grad[s:s + ctx.chunk].float()
            logits = (h @ weight.t()).float()
            # d logp(t) / d logits = onehot(t) - softmax(logits)
            dlogits = logits.sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g[:, None])
            rows = torch.arange(h.shape[0], device=h.device)
            dlogits.index_put_((rows, targets[s:s + ctx.chunk]), g, accumulate=True)
            if amp is not None:  # the two products in the compute dtype, accumulated in the weights' dtype
                if need_h:
                    grad_h[s:s + ctx.chunk] = dlogits @ weight
                if need_w:
                    grad_w += dlogits.t() @ h
                continue
            dlogits = dlogits.to(weight.dtype)
            if need_h:
                torch.mm(dlogits, weight, out=grad_h[s:s + ctx.chunk])
            if need_w:
                grad_w.addmm_(dlogits.t(), h)
        return grad_h, grad_w, None, None


def _fusable(head: Head) -> bool:
    """The fused projection handles a plain `nn.Linear` without bias or logit transforms, on ordinary tensors."""
    lin = head.linear
    return (type(lin) is torch.nn.Linear and lin.bias is None and not (head.scale or head.divide or head.softcap)
            and type(lin.weight.data) is torch.Tensor)


def token_logps(head: Head, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log p(target) for each row of `hidden` [N, H] -> [N], projecting `chunk_size` rows at a time.

    With gradients on, each chunk's logits are dropped after forward and recomputed in backward.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.linear.weight.requires_grad)
    if _fusable(head):
        if needs_grad:
            return _LinearTokenLogps.apply(hidden, head.linear.weight, targets, chunk_size)
        with torch.no_grad():
            return _LinearTokenLogps.project(hidden, head.linear.weight, targets, chunk_size)[0]
    parts = []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if needs_grad:
            parts.append(checkpoint(_token_logps, head, h, t, use_reentrant=False))
        else:
            parts.append(_token_logps(head, h, t))
    return torch.cat(parts)


def _answer_mask(batch: PromptAnswerBatch) -> torch.Tensor:
    width = batch.answer_ids.shape[1]
    return torch.arange(width, device=batch.answer_ids.device)[None, :] < batch.answer_lens[:, None]


# --------------------------------------------------------------------------------------------- grouping
# What one extra forward call costs, in tokens of work: Python and kernel-launch overhead. On a CPU a forward is
# cheap to start, so a batch splits into many exact-length groups; on a GPU launches are dear and groups stay big.
CALL_COST_TOKENS = {"cpu": 32, "cuda": 2048}
DEFAULT_CALL_COST = 512


def plan_groups(widths: list[tuple[int, ...]], *, rows_per_item: int = 1, call_cost: float = 0.0) -> list[list[int]]:
    """Cut items 0..n-1 (in length order) into contiguous groups of least total cost, by dynamic programming.

    A group of g items costs `g * rows_per_item * sum_d max(width[d] over the group) + call_cost`: each item has
    one width per padded block (prompt, each answer slot) and a block is padded to its longest member. Sorted
    items make contiguous groups the good ones; the plan weighs padding against one more forward call. O(n^2 d).
    """
    n = len(widths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        longest = [0] * len(widths[0])
        for i in range(j - 1, -1, -1):
            longest = [max(x, y) for x, y in zip(longest, widths[i])]
            c = best[i] + (j - i) * rows_per_item * sum(longest) + call_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(list(range(cut[j], j)))
        j = cut[j]
    return groups[::-1]


def length_groups(batch: PromptAnswerBatch, *, shared: bool, trim_padding: bool) -> list[list[int]]:
    """Prompt rows of `batch` in groups of similar length, each group padded only to its own longest row.

    Cost model, in tokens: shared layout = prompts once + each answer slot to its own width (1 + k forward
    calls); plain layout = every answer row as prompt + answer (one call); a call costs `CALL_COST_TOKENS`.
    """
    b, k = batch.size, batch.k
    if not trim_padding or b == 1:
        return [list(range(b))]
    p = batch.prompt_lens.tolist()
    a = batch.answer_lens.view(b, k).tolist()
    call = CALL_COST_TOKENS.get(batch.answer_ids.device.type, DEFAULT_CALL_COST)
    order = sorted(range(b), key=lambda r: (p[r] + max(a[r]), p[r]))
    if shared:
        groups = plan_groups([(p[r], *a[r]) for r in order], call_cost=call * (1 + k))
    else:
        groups = plan_groups([(p[r] + max(a[r]),) for r in order], rows_per_item=k, call_cost=call)
    return [[order[i] for i in g] for g in groups]


def _run_grouped(model, batch: PromptAnswerBatch, groups: list[list[int]], layout, chunk_size: int) -> AnswerLogps:
    """Run `layout` on each group's sub-batch, then project all answer predictors together, in chunks.

    `layout(model, sub, prompt_embeds, answer_embeds)` returns (predictor hidden states [T, H], target ids [T],
    answer row in `sub` [T]). The token embeddings are looked up once for the whole batch: the backward of an
    embedding builds a dense [vocab, hidden] gradient per call, which would otherwise be paid once per group.
    """
    dev, k = batch.answer_ids.device, batch.k
    embed = _unwrap(model).get_input_embeddings()
    prompt_embeds, answer_embeds = embed(batch.prompt_ids), embed(batch.answer_ids)
    hidden, targets, rows = [], [], []
    for group in groups:
        if len(groups) == 1:
            sub, p_emb, a_emb = batch, prompt_embeds, answer_embeds
        else:
            idx = torch.tensor(group, dtype=torch.long, device=dev)
            sub = batch.select(idx)
            answer_rows = (idx[:, None] * k + torch.arange(k, device=dev)).reshape(-1)
            p_emb = prompt_embeds[idx, : sub.prompt_ids.shape[1]]
            a_emb = answer_embeds[answer_rows, : sub.answer_ids.shape[1]]
        h, t, r = layout(model, sub, p_emb, a_emb)
        hidden.append(h)
        targets.append(t)
        rows.append(r if len(groups) == 1 else answer_rows[r])
    hidden_all = hidden[0] if len(hidden) == 1 else torch.cat(hidden)
    per_token = token_logps(Head(model), hidden_all, torch.cat(targets), chunk_size)
    rows_all = torch.cat(rows)
    if batch.answer_mask is not None:
        # Each row's tokens come in column order (both layouts select them row by row, columns ascending).
        per_token = per_token * batch.answer_mask[_answer_mask(batch)].to(per_token.dtype)[_column_order(rows_all)]
    sums = torch.zeros(batch.answer_ids.shape[0], dtype=per_token.dtype, device=dev)
    return AnswerLogps(sums.index_add(0, rows_all, per_token), batch.answer_lens)


def _column_order(rows: torch.Tensor) -> torch.Tensor:
    """For tokens listed row by row in any row order (columns ascending within a row), the position of each in
    the row-major order of `batch.answer_mask[_answer_mask(batch)]`."""
    order = torch.argsort(rows, stable=True)  # row-major position -> index in `rows`
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=rows.device)
    return inverse


# --------------------------------------------------------------------------------------------- the two layouts
def _plain_layout(model, batch: PromptAnswerBatch, prompt_embeds: torch.Tensor, answer_embeds: torch.Tensor):
    """Each answer row as its own right-padded sequence `prompt + answer`."""
    k, dev = batch.k, batch.answer_ids.device
    n_rows = batch.answer_ids.shape[0]
    p_lens = batch.prompt_lens.repeat_interleave(k)
    total = p_lens + batch.answer_lens
    pos = torch.arange(int(total.max()), device=dev)[None, :]
    in_prompt = pos < p_lens[:, None]
    # Column c of the answer block sits at sequence position p_len + c.
    p_col = pos.clamp(max=batch.prompt_ids.shape[1] - 1).expand_as(in_prompt)
    a_col = (pos - p_lens[:, None]).clamp(0, batch.answer_ids.shape[1] - 1)
    row = torch.arange(n_rows, device=dev)[:, None]
    embeds = torch.where(in_prompt[..., None], prompt_embeds[row // k, p_col], answer_embeds[row, a_col])
    attn = (pos < total[:, None]).long()
    hidden = body_of(model)(inputs_embeds=embeds, attention_mask=attn, use_cache=False).last_hidden_state
    amask = _answer_mask(batch)
    # The answer token at column c is predicted by the hidden state at position p_len + c - 1.
    src = (p_lens[:, None] - 1 + torch.arange(amask.shape[1], device=dev)[None, :])[amask]
    rows = row.expand_as(amask)[amask]
    return hidden[rows, src], batch.answer_ids[amask], rows


def _reusable_cache(out, cache_name: str, prompt_width: int):
    """The prompt's key/value cache if answers can continue from it; otherwise TypeError (the caller falls back)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = getattr(out, cache_name, None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"the model returned {type(cache).__name__}, not a DynamicCache")
    # Sliding-window, linear-attention or quantised layers do not keep every prompt state verbatim.
    odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if odd:
        raise TypeError(f"its cache layers ({', '.join(sorted(odd))}) cannot be continued from a padded prompt")
    if cache.get_seq_length() != prompt_width:
        raise TypeError("the prompt's key/value cache came back empty")
    return cache


def _shared_layout(model, batch: PromptAnswerBatch, prompt_embeds: torch.Tensor, answer_embeds: torch.Tensor):
    """Prompts once; each answer slot (chosen, then rejected) continues from the prompts' key/value cache.

    The prompt block stays right-padded in the cache; the attention mask hides the padding and explicit position
    ids continue each row at its true prompt length, so every answer sees exactly its prompt. The slots run one
    after another from the same prompt states (restored between slots), so the cache is never copied k times
    and each slot is padded only to its own longest answer.
    """
    body, k, dev = body_of(model), batch.k, batch.answer_ids.device
    cache_name = _cache_kwarg(body)
    p_width = batch.prompt_ids.shape[1]
    p_mask = torch.arange(p_width, device=dev)[None, :] < batch.prompt_lens[:, None]
    out = body(inputs_embeds=prompt_embeds, attention_mask=p_mask.long(), use_cache=True)
    cache = _reusable_cache(out, cache_name, p_width)
    prompt_states = [(layer.keys, layer.values) for layer in cache.layers]
    # Predictor of answer column 0 is the last prompt state; of column c>0, the answer state at c-1.
    first = out.last_hidden_state[torch.arange(batch.size, device=dev), batch.prompt_lens - 1]
    del out
    hidden, targets, rows = [], [], []
    for s in range(k):
        lens = batch.answer_lens[s::k]
        width = int(lens.max())
        ids, embeds = batch.answer_ids[s::k, :width], answer_embeds[s::k, :width]
        amask = torch.arange(width, device=dev)[None, :] < lens[:, None]
        for layer, (keys, values) in zip(cache.layers, prompt_states):
            layer.keys, layer.values = keys, values
        positions = batch.prompt_lens[:, None] + torch.arange(width, device=dev)[None, :]
        attn = torch.cat([p_mask, amask], dim=1).long()
        ans = body(inputs_embeds=embeds, attention_mask=attn, position_ids=positions, use_cache=True,
                   **{cache_name: cache}).last_hidden_state
        predictors = torch.cat([first[:, None], ans[:, :-1]], dim=1)
        hidden.append(predictors[amask])
        targets.append(ids[amask])
        slot_rows = torch.arange(batch.size, device=dev) * k + s
        rows.append(slot_rows[:, None].expand_as(amask)[amask])
    return torch.cat(hidden), torch.cat(targets), torch.cat(rows)


def plain_logps(model, batch: PromptAnswerBatch, *, chunk_size: int = 1024, trim_padding: bool = True) -> AnswerLogps:
    """Each answer row as its own sequence `prompt + answer` (the prompt is computed once per answer)."""
    groups = length_groups(batch, shared=False, trim_padding=trim_padding)
    return _run_grouped(model, batch, groups, _plain_layout, chunk_size)


def shared_prefix_logps(model, batch: PromptAnswerBatch, *, chunk_size: int = 1024,
                        trim_padding: bool = True) -> AnswerLogps:
    """Prompts once; the k answers of each prompt continue from its key/value cache."""
    if _checkpointing(model):
        # A checkpointed layer is replayed in backward; Hugging Face layers then drop the cache, since the replay
        # would write it twice. Without a cache the answers would not see their prompt.
        raise NotImplementedError("gradient checkpointing drops the key/value cache in training")
    groups = length_groups(batch, shared=True, trim_padding=trim_padding)
    return _run_grouped(model, batch, groups, _shared_layout, chunk_size)


def _checkpointing(model) -> bool:
    hf = _unwrap(model)
    if not (hf.training and torch.is_grad_enabled()):
        return False
    on = getattr(hf, "is_activation_checkpointing", None)  # the newer name of `is_gradient_checkpointing`
    return bool(on if on is not None else getattr(hf, "is_gradient_checkpointing", False))


_WARNED: set[str] = set()


def answer_logps(model, batch: PromptAnswerBatch, *, prefix_sharing: bool = True, chunk_size: int = 1024,
                 trim_padding: bool = True) -> AnswerLogps:
    """Summed log-probs of every answer in `batch` under `model`; prefix sharing when the model allows it.

    `trim_padding` runs the batch as sub-batches of similar length (same numbers, less padding computed).
    A model that cannot continue answers from a prompt cache falls back to the plain layout, with one warning.
    `model` may also be the module form below (sharded by FSDP, its forward is what gathers the weights).
    """
    if isinstance(model, _Forward):
        logps, lengths = model(batch, prefix_sharing=prefix_sharing, chunk_size=chunk_size, trim_padding=trim_padding)
        return AnswerLogps(logps, lengths)
    with compute_precision(model):
        return _answer_logps(model, batch, prefix_sharing=prefix_sharing, chunk_size=chunk_size,
                             trim_padding=trim_padding)


def compute_precision(model):
    """Autocast to the compute dtype `set_compute_dtype` gave the model (mixed precision), else nothing."""
    hf = _unwrap(model)
    dtype = getattr(hf, "preftune_compute_dtype", None)
    if dtype is None:
        return nullcontext()
    return torch.autocast(next(hf.parameters()).device.type, dtype=dtype)


def set_compute_dtype(model, dtype: torch.dtype | None) -> None:
    """Compute `model`'s forwards under autocast to `dtype` (its weights keep their own dtype)."""
    _unwrap(model).preftune_compute_dtype = dtype


def _answer_logps(model, batch: PromptAnswerBatch, *, prefix_sharing: bool, chunk_size: int,
                  trim_padding: bool) -> AnswerLogps:
    if prefix_sharing and batch.k > 1:
        name = type(_unwrap(model)).__name__
        key = f"{name}/checkpointing" if _checkpointing(model) else name
        if key not in _WARNED:
            try:
                return shared_prefix_logps(model, batch, chunk_size=chunk_size, trim_padding=trim_padding)
            except (TypeError, ValueError, NotImplementedError, AttributeError) as exc:
                _WARNED.add(key)
                log.warning("%s cannot continue answers from a shared prompt cache (%s); using the plain path",
                            name, exc)
    return plain_logps(model, batch, chunk_size=chunk_size, trim_padding=trim_padding)


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
        per_token = F.log_softmax(logits[len(p) - 1: -1], dim=-1).gather(-1, a[:, None])[:, 0]
        if batch.answer_mask is not None:
            per_token = per_token * batch.answer_mask[j, : batch.answer_lens[j]]
        lp = per_token.sum()
        sums.append(lp)
    return AnswerLogps(torch.stack(sums), batch.answer_lens)


class _Forward(torch.nn.Module):
    """Module form of `answer_logps`, so data-parallel wrappers see the whole computation as one forward."""

    def __init__(self, model, prefix_sharing: bool, chunk_size: int, trim_padding: bool = True):
        super().__init__()
        self.model = model
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


def sharded_logps_module(model, *, prefix_sharing: bool = True, chunk_size: int = 1024) -> _Forward:
    """A frozen model's log-prob module sharded with FSDP2 (for a reference); `answer_logps` accepts it."""
    from .parallel import shard

    return shard(_Forward(model, prefix_sharing, chunk_size), model, frozen=True)


class AnswerLogpModule:
    """The policy's answer log-probs as the training loop calls them, data-parallel under torchrun.

    Under torchrun the module is wrapped in DDP (every rank holds all weights), or with `fsdp` sharded by
    FSDP2 (each rank holds 1/world of them; see parallel.py).
    """

    def __init__(self, model, *, prefix_sharing: bool = True, chunk_size: int = 1024, trim_padding: bool = True,
                 env=None, fsdp: bool = False):
        self.inner = _Forward(model, prefix_sharing, chunk_size, trim_padding)
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
