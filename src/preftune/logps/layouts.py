"""The two layouts that compute answer log-probs, with the same numbers:

- plain: every answer row is its own sequence `prompt + answer` (the prompt is computed once per answer);
- prefix-shared: the prompts run once, and all k answers of a prompt continue from its key/value cache.

Either way only the hidden states that predict answer tokens are projected to the vocabulary (projection.py),
and a batch runs as sub-batches of similar length (planner.py, `trim_padding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.batching import PromptAnswerBatch
from .parts import Head, body_of, cache_kwarg, checkpointing, unwrap
from .planner import length_groups
from .projection import token_logps


@dataclass
class AnswerLogps:
    logps: torch.Tensor    # [B*k] summed log-prob of each answer
    lengths: torch.Tensor  # [B*k] answer tokens counted


def _answer_mask(batch: PromptAnswerBatch) -> torch.Tensor:
    width = batch.answer_ids.shape[1]
    return torch.arange(width, device=batch.answer_ids.device)[None, :] < batch.answer_lens[:, None]


def _run_grouped(model, batch: PromptAnswerBatch, groups: list[list[int]], layout, chunk_size: int) -> AnswerLogps:
    """Run `layout` on each group's sub-batch, then project all answer predictors together, in chunks.

    `layout(model, sub, prompt_embeds, answer_embeds)` returns (predictor hidden states [T, H], target ids [T],
    answer row in `sub` [T]). The token embeddings are looked up once for the whole batch: the backward of an
    embedding builds a dense [vocab, hidden] gradient per call, which would otherwise be paid once per group.
    """
    dev, k = batch.answer_ids.device, batch.k
    embed = unwrap(model).get_input_embeddings()
    prompt_embeds, answer_embeds = embed(batch.prompt_ids), embed(batch.answer_ids)
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
    p_host, a_host = batch.lengths()
    pos = torch.arange(max(p_host[j // k] + a for j, a in enumerate(a_host)), device=dev)[None, :]
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
    cache_name = cache_kwarg(body)
    p_width = batch.prompt_ids.shape[1]
    p_mask = torch.arange(p_width, device=dev)[None, :] < batch.prompt_lens[:, None]
    out = body(inputs_embeds=prompt_embeds, attention_mask=p_mask.long(), use_cache=True)
    cache = _reusable_cache(out, cache_name, p_width)
    prompt_states = [(layer.keys, layer.values) for layer in cache.layers]
    # Predictor of answer column 0 is the last prompt state; of column c>0, the answer state at c-1.
    first = out.last_hidden_state[torch.arange(batch.size, device=dev), batch.prompt_lens - 1]
    del out
    hidden, targets, rows = [], [], []
    a_host = batch.lengths()[1]
    for s in range(k):
        lens = batch.answer_lens[s::k]
        width = max(a_host[s::k])
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


def plain_logps(model, batch: PromptAnswerBatch, *, chunk_size: int = 1024, trim_padding: bool = True,
                groups: list[list[int]] | None = None) -> AnswerLogps:
    """Each answer row as its own sequence `prompt + answer` (the prompt is computed once per answer)."""
    groups = groups or length_groups(batch, shared=False, trim_padding=trim_padding)
    return _run_grouped(model, batch, groups, _plain_layout, chunk_size)


def shared_prefix_logps(model, batch: PromptAnswerBatch, *, chunk_size: int = 1024, trim_padding: bool = True,
                        groups: list[list[int]] | None = None) -> AnswerLogps:
    """Prompts once; the k answers of each prompt continue from its key/value cache."""
    if checkpointing(model):
        # A checkpointed layer is replayed in backward; Hugging Face layers then drop the cache, since the replay
        # would write it twice. Without a cache the answers would not see their prompt.
        raise NotImplementedError("gradient checkpointing drops the key/value cache in training")
    groups = groups or length_groups(batch, shared=True, trim_padding=trim_padding)
    return _run_grouped(model, batch, groups, _shared_layout, chunk_size)

