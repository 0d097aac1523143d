"""The packed layout: every prompt once and its answers after it, all in one row with no padding.

The decoder's linear layers then run on real tokens only, in one call per batch. Position ids restart for every
prompt and continue each answer from its prompt's length, so rope sees what a whole-model forward of
`prompt + answer` sees. Attention is the one part that must not see the row as one sequence: for each pair the
prompt attends causally to itself, and each answer to its prompt and to its own earlier tokens, never to another
pair or to its sibling answers. `TreeRows` holds that structure; Hugging Face's decoders pass keyword arguments
they do not know down to their attention function, so the row's `TreeRows` travels with the call (and with an
activation-checkpointed layer's replay) to `_attention`, which the "sdpa" entry of Hugging Face's attention table
delegates to. Without a `TreeRows` that entry is the stock function, unchanged.

Used on the CPU, where the many small attention calls cost little beside the padding they save; a model whose
attention does not take this route (the layer count of calls is checked) falls back to the other layouts.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..data.batching import PromptAnswerBatch
from .layouts import AnswerLogps, run_grouped
from .parts import body_of, text_config, unwrap

KWARG = "preftune_tree_rows"
_MASKS_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("preftune_masks_off", default=False)
_STOCK: dict[str, object] = {}


class TreeRows:
    """Where each pair's prompt and answers lie in a packed row, and the mask of each pair's answer block.

    The row holds all prompts first (pair order), then all answers (answer-row order, so a pair's k answers are
    contiguous). Pair i's answer block attends to its prompt (all of it) and, within the block, each answer to its
    own tokens up to itself.
    """

    def __init__(self, prompt_lens: list[int], answer_lens: list[int], k: int, device: torch.device):
        b = len(prompt_lens)
        blocks = [sum(answer_lens[i * k:(i + 1) * k]) for i in range(b)]
        self.sizes = list(prompt_lens) + blocks          # split sizes along the row
        self.pairs = b
        self.longest = max(p + max(answer_lens[i * k:(i + 1) * k]) for i, p in enumerate(prompt_lens))
        self.masks = []
        for i, p in enumerate(prompt_lens):
            lens = answer_lens[i * k:(i + 1) * k]
            if not blocks[i]:
                self.masks.append(None)
                continue
            slot = torch.repeat_interleave(torch.arange(k, device=device), torch.tensor(lens, device=device))
            col = torch.cat([torch.arange(n, device=device) for n in lens])
            own = (slot[:, None] == slot[None, :]) & (col[None, :] <= col[:, None])
            self.masks.append(torch.cat([own.new_ones(blocks[i], p), own], dim=1))
        self.calls = 0  # attention calls that took this structure (checked against the layer count)


def _attention(*args, **kwargs):
    """The "sdpa" entry: the packed row's attention when the call carries its `TreeRows`, else the stock one with
    the arguments as given."""
    rows = kwargs.pop(KWARG, None)
    if rows is None:
        return _STOCK["attention"](*args, **kwargs)
    return _tree_attention(rows, *args, **kwargs)


def _tree_attention(rows: TreeRows, module, query, key, value, attention_mask=None, dropout: float = 0.0,
                    scaling: float | None = None, **kwargs):
    for name in ("softcap", "s_aux", "position_bias", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"its attention takes {name}")
    if attention_mask is not None:  # masks are off while a packed row runs: this one is the model's own bias
        raise NotImplementedError("its attention takes a mask or bias of its own")
    window = kwargs.get("sliding_window")
    if window is not None and rows.longest > window:
        raise ValueError(f"a pair of {rows.longest} tokens does not fit its sliding window of {window}")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True) or query.shape[0] != 1:
        raise NotImplementedError("its attention is not causal self-attention over one row")
    rows.calls += 1
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]  # grouped-query attention; latent attention gives every head its own
    q = query.split(rows.sizes, dim=2)
    k = repeat_kv(key, groups).split(rows.sizes, dim=2)
    v = repeat_kv(value, groups).split(rows.sizes, dim=2)
    b = rows.pairs
    out = [F.scaled_dot_product_attention(q[i], k[i], v[i], dropout_p=dropout, is_causal=True, scale=scaling)
           if rows.sizes[i] else q[i] for i in range(b)]
    for i in range(b):
        if rows.masks[i] is None:
            out.append(q[b + i])
            continue
        keys, values = torch.cat([k[i], k[b + i]], dim=2), torch.cat([v[i], v[b + i]], dim=2)
        out.append(F.scaled_dot_product_attention(q[b + i], keys, values, attn_mask=rows.masks[i],
                                                   dropout_p=dropout, scale=scaling))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def _mask(*args, **kwargs):
    """The "sdpa" mask entry: no mask while a packed row runs (its attention builds its own), else the stock one."""
    if _MASKS_OFF.get():
        return None
    return _STOCK["mask"](*args, **kwargs)


def _install() -> None:
    """Put the delegating entries into Hugging Face's attention and mask tables (once)."""
    if _STOCK:
        return
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    _STOCK["attention"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
    _STOCK["mask"] = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register("sdpa", _attention)
    AttentionMaskInterface.register("sdpa", _mask)


@contextmanager
def _masks_off():
    token = _MASKS_OFF.set(True)
    try:
        yield
    finally:
        _MASKS_OFF.reset(token)


def packs(model) -> bool:
    """Whether `model` may take the packed layout: a CPU model whose attention is Hugging Face's "sdpa"."""
    hf = unwrap(model)
    cfg = hf.config
    return (getattr(cfg, "_attn_implementation", None) == "sdpa" and next(hf.parameters()).device.type == "cpu"
            and getattr(hf, "_supports_attention_backend", False))


def packed_layout(model, batch: PromptAnswerBatch, prompt_embeds: torch.Tensor, answer_embeds: torch.Tensor,
                  router=None):
    """(predictor hidden states [T, H], target ids [T], answer row [T]) from one packed decoder call."""
    _install()
    k, dev = batch.k, batch.answer_ids.device
    p_host, a_host = batch.lengths()
    if not min(p_host):
        raise ValueError("a row has no prompt token to predict its first answer token from")
    pmask = torch.arange(batch.prompt_ids.shape[1], device=dev)[None, :] < batch.prompt_lens[:, None]
    amask = torch.arange(batch.answer_ids.shape[1], device=dev)[None, :] < batch.answer_lens[:, None]
    embeds = torch.cat([prompt_embeds[pmask], answer_embeds[amask]])
    a_cols = amask.nonzero()  # [A, 2]: (answer row, column), row-major
    p_of_row = batch.prompt_lens.repeat_interleave(k)
    positions = torch.cat([pmask.nonzero()[:, 1], p_of_row[a_cols[:, 0]] + a_cols[:, 1]])
    rows = TreeRows(p_host, a_host, k, dev)
    cfg = text_config(model)
    chunk = getattr(cfg, "attention_chunk_size", None)  # Llama 4's chunked layers: attention restarts per chunk
    if chunk and rows.longest > chunk:
        raise ValueError(f"a pair of {rows.longest} tokens is longer than its attention chunks of {chunk}")
    with _masks_off():
        out = body_of(model)(inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False,
                             **{KWARG: rows}, **({} if router is None else {"output_router_logits": True}))
    if rows.calls != cfg.num_hidden_layers:
        raise TypeError(f"{rows.calls} of its {cfg.num_hidden_layers} layers took the packed attention")
    n_prompt = sum(p_host)
    if router is not None:  # a prompt counts once per answer, as in the sequences `prompt + answer`
        in_prompt = torch.arange(len(embeds), device=dev)[None, :] < n_prompt
        router.add(out, in_prompt, times=k)
        router.add(out, ~in_prompt)
    hidden = out.last_hidden_state[0]
    # Answer token (row j, column c) is predicted by the state before it: its prompt's last token for c = 0.
    prompt_end = torch.cumsum(batch.prompt_lens, 0) - 1
    src = torch.arange(n_prompt - 1, n_prompt - 1 + len(a_cols), device=dev)
    src = torch.where(a_cols[:, 1] == 0, prompt_end[torch.div(a_cols[:, 0], k, rounding_mode="floor")], src)
    return hidden[src], batch.answer_ids[amask], a_cols[:, 0]


def packed_logps(model, batch: PromptAnswerBatch, *, chunk_size: int = 1024, router=None) -> AnswerLogps:
    """Prompts once, answers after them, all in one row without padding (a CPU model with "sdpa" attention).

    Raises TypeError, ValueError or NotImplementedError where the model's attention cannot take the row.
    """
    return run_grouped(model, batch, [list(range(batch.size))], packed_layout, chunk_size, router)
