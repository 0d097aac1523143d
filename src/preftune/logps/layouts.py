"""The two layouts that compute answer log-probs, with the same numbers:

- plain: every answer row is its own sequence `prompt + answer` (the prompt is computed once per answer);
- prefix-shared: the prompts run once, and all k answers of a prompt continue from its key/value cache.

Either way only the hidden states that predict answer tokens are projected to the vocabulary (projection.py),
and a batch runs as sub-batches of similar length (planner.py, `trim_padding`). On a CPU a third layout,
packed.py, runs the batch without padding where the model's attention allows it; these two are the rest.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ..data.batching import PromptAnswerBatch
from .parts import Head, body_of, cache_kwarg, checkpointing, embed_tokens, unwrap, width_multiple
from .planner import length_groups
from .projection import token_logps
from .router import RouterLogits


@dataclass
class AnswerLogps:
    logps: torch.Tensor    # [B*k] summed log-prob of each answer
    lengths: torch.Tensor  # [B*k] answer tokens counted
    aux_loss: torch.Tensor | None = None  # router load-balancing loss (mixture of experts), when asked for


def _answer_mask(batch: PromptAnswerBatch) -> torch.Tensor:
    width = batch.answer_ids.shape[1]
    return torch.arange(width, device=batch.answer_ids.device)[None, :] < batch.answer_lens[:, None]


def run_grouped(model, batch: PromptAnswerBatch, groups: list[list[int]], layout, chunk_size: int,
                 router: RouterLogits | None) -> AnswerLogps:
    """Run `layout` on each group's sub-batch, then project all answer predictors together, in chunks.

    `layout(model, sub, prompt_embeds, answer_embeds, router)` returns (predictor hidden states [T, H], target ids [T],
    answer row in `sub` [T]). The token embeddings of prompts and answers are looked up in one call for the whole
    batch: where the gradient of an embedding is dense, its backward builds a [vocab, hidden] matrix per call
    (zero-filled, then added to the others), which would otherwise be paid once per group, or twice per batch.
    `router`, when given, collects the router logits of every body call.
    """
    dev, k = batch.answer_ids.device, batch.k
    n_prompt = batch.prompt_ids.numel()
    embeds = embed_tokens(model, torch.cat([batch.prompt_ids.reshape(-1), batch.answer_ids.reshape(-1)]))
    prompt_embeds = embeds[:n_prompt].view(*batch.prompt_ids.shape, -1)
    answer_embeds = embeds[n_prompt:].view(*batch.answer_ids.shape, -1)
    hidden, targets, rows = [], [], []
    for group in groups:
        if len(groups) == 1:
            sub, p_emb, a_emb = batch, prompt_embeds, answer_embeds
        else:
            sub = batch.select(group)
            idx = torch.tensor(group, dtype=torch.long, device=dev)
            answer_rows = (idx[:, None] * k + torch.arange(k, device=dev)).reshape(-1)
            p_emb = prompt_embeds[idx, : sub.prompt_ids.shape[1]]
            a_emb = answer_embeds[answer_rows, : sub.answer_ids.shape[1]]
        h, t, r = layout(model, sub, p_emb, a_emb, router)
        hidden.append(h)
        targets.append(t)
        rows.append(r if len(groups) == 1 else answer_rows[r])
    hidden_all = hidden[0] if len(hidden) == 1 else torch.cat(hidden)
    rows_all = torch.cat(rows)
    per_token = _project(Head(model), hidden_all, torch.cat(targets), rows_all, batch, router, chunk_size)
    if batch.answer_mask is not None:
        # Each row's tokens come in column order (both layouts select them row by row, columns ascending).
        per_token = per_token * batch.answer_mask[_answer_mask(batch)].to(per_token.dtype)[_column_order(rows_all)]
    sums = torch.zeros(batch.answer_ids.shape[0], dtype=per_token.dtype, device=dev)
    return AnswerLogps(sums.index_add(0, rows_all, per_token), batch.answer_lens)


def skips_grad(batch: PromptAnswerBatch, router: RouterLogits | None) -> bool:
    """Whether this call computes `batch.no_grad_slots` without autograd. Not with router logits gathered: a
    mixture of experts' balancing loss takes those slots' router logits with their gradient."""
    return bool(batch.no_grad_slots) and router is None and torch.is_grad_enabled()


def _project(head: Head, hidden: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, batch: PromptAnswerBatch,
             router: RouterLogits | None, chunk_size: int) -> torch.Tensor:
    """log p(target) of each token; those of `batch.no_grad_slots` projected without autograd (their backward
    would only multiply zeros)."""
    if not skips_grad(batch, router):
        return token_logps(head, hidden, targets, chunk_size)
    still = batch.in_no_grad_slot(rows)
    live, fixed = (~still).nonzero().squeeze(1), still.nonzero().squeeze(1)
    with torch.no_grad():  # first: the live rows' projection then leaves its log-probs for backward to reuse
        rest = token_logps(head, hidden[fixed], targets[fixed], chunk_size)
    out = token_logps(head, hidden[live], targets[live], chunk_size)
    return torch.cat([out, rest])[torch.argsort(torch.cat([live, fixed]))]


def _column_order(rows: torch.Tensor) -> torch.Tensor:
    """For tokens listed row by row in any row order (columns ascending within a row), the position of each in
    the row-major order of `batch.answer_mask[_answer_mask(batch)]`."""
    order = torch.argsort(rows, stable=True)  # row-major position -> index in `rows`
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=rows.device)
    return inverse


# --------------------------------------------------------------------------------------------- the two layouts
def _router_kwargs(router: RouterLogits | None) -> dict:
    return {} if router is None else {"output_router_logits": True}


def _plain_layout(model, batch: PromptAnswerBatch, prompt_embeds: torch.Tensor, answer_embeds: torch.Tensor,
                  router: RouterLogits | None = None):
    """Each answer row as its own right-padded sequence `prompt + answer`."""
    k, dev = batch.k, batch.answer_ids.device
    n_rows = batch.answer_ids.shape[0]
    p_lens = batch.prompt_lens.repeat_interleave(k)
    total = p_lens + batch.answer_lens
    p_host, a_host = batch.lengths()
    width, multiple = max(p_host[j // k] + a for j, a in enumerate(a_host)), width_multiple(model)
    pos = torch.arange(-(-width // multiple) * multiple, device=dev)[None, :]
    in_prompt = pos < p_lens[:, None]
    # Column c of the answer block sits at sequence position p_len + c.
    p_col = pos.clamp(max=batch.prompt_ids.shape[1] - 1).expand_as(in_prompt)
    a_col = (pos - p_lens[:, None]).clamp(0, batch.answer_ids.shape[1] - 1)
    row = torch.arange(n_rows, device=dev)[:, None]
    embeds = torch.where(in_prompt[..., None], prompt_embeds[row // k, p_col], answer_embeds[row, a_col])
    # No attention mask: each row is right-padded, so under causal attention no real token sees a padding column
    # (padding only follows it). The decoder then builds no padding mask and attention may take its causal kernel.
    out = body_of(model)(inputs_embeds=embeds, use_cache=False, **_router_kwargs(router))
    if router is not None:
        router.add(out, pos < total[:, None])
    hidden = out.last_hidden_state
    amask = _answer_mask(batch)
    # The answer token at column c is predicted by the hidden state at position p_len + c - 1.
    src = (p_lens[:, None] - 1 + torch.arange(amask.shape[1], device=dev)[None, :])[amask]
    rows = row.expand_as(amask)[amask]
    return hidden[rows, src], batch.answer_ids[amask], rows


def _pinned_cache(model, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None, prefix_len: int, span: int):
    """A key/value cache whose layers hold `prefix` (one (keys, values) per layer) and whose `update` is pure.

    `prefix_len` is the prefix's width in cache slots, `span` the width of prefix plus the call's tokens: a
    sliding window must cover it, since the mask measures the window in slots and the prompts are right-padded.

    Each update returns the prefix plus the states it is given and keeps that as the layer's content, without
    appending to what an earlier update left. A checkpointed decoder layer replayed in backward therefore sees
    exactly the keys its forward saw (a plain DynamicLayer would append the replayed states a second time), and
    every answer slot can start from the same prompt states. Raises TypeError for layers it cannot hold this way.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    cfg = unwrap(model).config
    cache = DynamicCache(config=cfg)
    if not cache.layers:
        raise TypeError("its cache has no layers before the first forward")
    if "chunked_attention" in (getattr(cfg, "layer_types", None) or ()):
        raise TypeError("chunked attention is measured in cache slots")
    for i, layer in enumerate(cache.layers):
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise TypeError(f"its cache layers ({type(layer).__name__}) do not keep every prompt state verbatim")
        if prefix is not None:
            layer.keys, layer.values = prefix[i]
            layer.is_initialized = True
        if isinstance(layer, DynamicSlidingWindowLayer):
            if span > layer.sliding_window:
                raise ValueError(f"{span} tokens do not fit its sliding window of {layer.sliding_window}")
            layer.cumulative_length = prefix_len
        layer.update = _pure_update(layer, prefix[i] if prefix is not None else None)
    return cache


def _pure_update(layer, prefix):
    def update(key_states, value_states, *args, **kwargs):
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        if prefix is None:
            keys, values = key_states, value_states
        else:
            keys, values = torch.cat([prefix[0], key_states], dim=-2), torch.cat([prefix[1], value_states], dim=-2)
        layer.keys, layer.values = keys, values
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = keys.shape[-2]
        return keys, values

    return update


@contextmanager
def _layers_keep_cache(body):
    """Under activation checkpointing, let Hugging Face's decoder layers use the (pure) cache they are given.

    They drop it by default, since a replayed layer would write it twice; `_pinned_cache` makes the replay
    write the same states again. Needs non-reentrant checkpointing: the prompt's states leave the checkpointed
    layer through the cache, which the reentrant variant would cut from the graph.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in body.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for m in layers:
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if getattr(fn, "keywords", {}).get("use_reentrant", True):
            raise NotImplementedError("reentrant gradient checkpointing cuts the prompt's cache from the graph")
    # Some bodies (GPT-2) also withhold the cache from their layers while their own flag is set; the layers'
    # flags are what checkpoints them.
    body_flag = body.__dict__.get("gradient_checkpointing")
    try:
        for m in layers:
            m._can_checkpoint_with_cache = True
        if body_flag:
            body.gradient_checkpointing = False
        yield
    finally:
        for m in layers:
            m.__dict__.pop("_can_checkpoint_with_cache", None)
        if body_flag:
            body.gradient_checkpointing = body_flag


def _shared_layout(model, batch: PromptAnswerBatch, prompt_embeds: torch.Tensor, answer_embeds: torch.Tensor,
                   router: RouterLogits | None = None):
    """Prompts once; each answer slot (chosen, then rejected) continues from the prompts' key/value cache.

    The prompt block stays right-padded in the cache; the attention mask hides the padding and explicit position
    ids continue each row at its true prompt length, so every answer sees exactly its prompt. The slots run one
    after another, each from a cache that holds the prompt states, so the cache is never copied k times and each
    slot is padded only to its own longest answer. Padding columns repeat their row's last position, so a call's
    largest position is that of a real token (rope that picks factors by it, see limits.py). The router logits
    of a prompt count once per answer slot, as each answer row's sequence holds its prompt.
    """
    body, k, dev = body_of(model), batch.k, batch.answer_ids.device
    cache_name = cache_kwarg(body)
    p_width = batch.prompt_ids.shape[1]
    p_mask = torch.arange(p_width, device=dev)[None, :] < batch.prompt_lens[:, None]
    with _layers_keep_cache(body) if checkpointing(model) else nullcontext():
        cache = _pinned_cache(model, None, 0, p_width)
        # Right-padded prompts need no mask here (nothing real follows a padding column); the answers' calls do.
        out = body(inputs_embeds=prompt_embeds, use_cache=True,
                   **{cache_name: cache}, **_router_kwargs(router))
        if router is not None:
            router.add(out, p_mask, times=k)
        if cache.get_seq_length() != p_width:
            raise TypeError("the prompt's key/value cache came back empty")
        prompt_states = [(layer.keys, layer.values) for layer in cache.layers]
        # Predictor of answer column 0 is the last prompt state; of column c>0, the answer state at c-1.
        first = out.last_hidden_state[torch.arange(batch.size, device=dev), batch.prompt_lens - 1]
        del out, cache
        hidden, targets, rows = [], [], []
        a_host = batch.lengths()[1]
        for s in range(k):
            lens = batch.answer_lens[s::k]
            width = max(a_host[s::k])
            ids, embeds = batch.answer_ids[s::k, :width], answer_embeds[s::k, :width]
            cols = torch.arange(width, device=dev)[None, :]
            amask = cols < lens[:, None]
            positions = batch.prompt_lens[:, None] + torch.minimum(cols, (lens[:, None] - 1).clamp(min=0))
            attn = torch.cat([p_mask, amask], dim=1).long()
            frozen = s in batch.no_grad_slots and skips_grad(batch, router)
            with torch.no_grad() if frozen else nullcontext():
                ans_out = body(inputs_embeds=embeds, attention_mask=attn, position_ids=positions, use_cache=True,
                               **{cache_name: _pinned_cache(model, prompt_states, p_width, p_width + width)},
                               **_router_kwargs(router))
            if router is not None:
                router.add(ans_out, amask)
            ans = ans_out.last_hidden_state
            predictors = torch.cat([first[:, None], ans[:, :-1]], dim=1)
            hidden.append(predictors[amask])
            targets.append(ids[amask])
            slot_rows = torch.arange(batch.size, device=dev) * k + s
            rows.append(slot_rows[:, None].expand_as(amask)[amask])
    return torch.cat(hidden), torch.cat(targets), torch.cat(rows)


def plain_logps(model, batch: PromptAnswerBatch, *, chunk_size: int = 1024, trim_padding: bool = True,
                groups: list[list[int]] | None = None, router: RouterLogits | None = None) -> AnswerLogps:
    """Each answer row as its own sequence `prompt + answer` (the prompt is computed once per answer)."""
    groups = groups or length_groups(batch, shared=False, trim_padding=trim_padding)
    return run_grouped(model, batch, groups, _plain_layout, chunk_size, router)


def shared_prefix_logps(model, batch: PromptAnswerBatch, *, chunk_size: int = 1024, trim_padding: bool = True,
                        max_span: int | None = None, groups: list[list[int]] | None = None,
                        router: RouterLogits | None = None) -> AnswerLogps:
    """Prompts once; the k answers of each prompt continue from its key/value cache.

    `max_span`: the longest prompt width + answer width a group may have (a sliding window; see limits.py).
    """
    groups = groups or length_groups(batch, shared=True, trim_padding=trim_padding, max_span=max_span)
    return run_grouped(model, batch, groups, _shared_layout, chunk_size, router)

