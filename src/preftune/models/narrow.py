"""A frozen reference's input embedding narrowed to the token ids a run's data holds.

A reference model only ever looks up the tokens of the run's own data: its tokenised prompts and answers, and
the pad token. The rest of its `[vocab, hidden]` input matrix is never read, yet it is a whole copy of the
policy's. On the benchmark's 151,936-token vocabulary at hidden 256 that is 148 MB of live tensors; for an 8B
model with a 128,256-token vocabulary, 1 GB in bf16 (2 GB in fp32) on the GPU. A corpus rarely holds more than a
fraction of a large vocabulary, so `narrow_input_embedding` keeps the rows of those ids only, and a lookup maps
each id to its kept row first: the embeddings are the same values, copied from the same rows. An id outside them
is refused, naming it, instead of reading another token's row.

Only preftune's own copy of a reference is narrowed (loaded from a path, or copied from a policy object), never
a model object a caller passed in, and not an embedding tied to the output head (every row of the head is read).
"""

from __future__ import annotations

import types

import torch

from ..errors import ConfigError, ModelError
from ..logps.parts import SPARSE_GRAD, unwrap

_ROW_OF = "_preftune_row_of"  # buffer on a narrowed embedding: token id -> kept row, -1 where not kept


def token_ids_of(items, extra=()) -> torch.Tensor:
    """The distinct token ids in tokenised items (every `..._ids` field) and `extra`, sorted."""
    seen = set(i for i in extra if i is not None)
    for item in items:
        for name, value in vars(item).items():
            if name.endswith("_ids"):
                seen.update(value)
    return torch.tensor(sorted(seen), dtype=torch.long)


def _narrowed_forward(self, ids: torch.Tensor) -> torch.Tensor:
    rows = getattr(self, _ROW_OF)[ids]
    if rows.device.type != "cpu":  # no host wait on an accelerator: an id left out stops the device instead
        torch._assert_async(rows.min() >= 0)
    elif bool((rows < 0).any()):
        missing = int(ids[rows < 0][0])
        raise ModelError(f"the reference model was narrowed to the run's token ids, and token id {missing} is not "
                         f"among them; this is a bug in preftune, please report it")
    return type(self).forward(self, rows)


def narrowable(model) -> bool:
    """Whether `narrow_input_embedding` may narrow frozen `model`'s input embedding: a plain `nn.Embedding` (or a
    subclass that only scales its output), frozen, neither sharded nor meta, not tied to the output head, and not
    narrowed already."""
    hf = unwrap(model)
    embed = hf.get_input_embeddings()
    head = hf.get_output_embeddings()
    if not isinstance(embed, torch.nn.Embedding) or embed.max_norm is not None or hasattr(embed, _ROW_OF):
        return False
    weight = embed.weight
    return not (weight.requires_grad or type(weight.data) is not torch.Tensor or weight.is_meta
                or (head is not None and getattr(head, "weight", None) is weight))


def vocabulary_size(model) -> int:
    """Rows of `model`'s input embedding, as the vocabulary has them (a narrowed one counts its whole vocabulary)."""
    embed = unwrap(model).get_input_embeddings()
    row_of = getattr(embed, _ROW_OF, None)
    return embed.weight.shape[0] if row_of is None else row_of.numel()


def require_items_fit(model, items, name: str) -> None:
    """Refuse tokenised items that `model` cannot run, in one line here where the lookup would fail deep in the
    forward: an id its embedding has no row for (a tokenizer of a larger vocabulary than the model's), or a
    prompt plus its longest answer past its learned position table. One walk over the items for both."""
    top, longest = -1, 0
    for item in items:
        prompt = answer = 0
        for key, value in vars(item).items():
            if key.endswith("_ids") and value:
                top = max(top, max(value))
                if key == "prompt_ids":
                    prompt = len(value)
                else:
                    answer = max(answer, len(value))
        longest = max(longest, prompt + answer)
    require_id_in_vocabulary(model, top, name)
    limit = learned_positions(model)
    if limit is not None and longest > limit:
        raise ConfigError(f"--max-length: {name} has a position table of {limit} positions, and the data holds "
                          f"sequences of up to {longest} tokens; pass --max-length {limit} (or less)")


# Module names of learned absolute position tables (GPT-2, OPT, BLOOM-style embeddings, GPT-Neo, ...): a sequence
# past their size indexes outside the table. Rotary and other computed positions extend, as in transformers.
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings", "pos_emb")


def learned_positions(model) -> int | None:
    """The size of `model`'s learned position table, or None when its positions are computed."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    learned = any(isinstance(m, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES
                  for name, m in model.named_modules())
    return int(limit) if learned and limit else None


def require_id_in_vocabulary(model, top: int, name: str) -> None:
    """`require_items_fit`'s vocabulary check, for the largest id `top`."""
    size = vocabulary_size(model)
    if top >= size:
        raise ModelError(f"{name}: its vocabulary has {size:,} tokens, but the tokenizer gives ids up to {top:,}; "
                         f"use the tokenizer the model was trained with (--tokenizer), or a model that has its "
                         f"vocabulary")


def narrow_input_embedding(model, token_ids: torch.Tensor) -> int:
    """Keep only the rows `token_ids` of frozen `model`'s input embedding; returns the bytes freed (0: left whole,
    when not `narrowable` or when the ids cover most of the vocabulary anyway)."""
    if not narrowable(model):
        return 0
    embed = unwrap(model).get_input_embeddings()
    weight = embed.weight
    vocab = weight.shape[0]
    keep = token_ids[(token_ids >= 0) & (token_ids < vocab)].unique().to(weight.device)
    if len(keep) > 0.75 * vocab:
        return 0
    row_of = torch.full((vocab,), -1, dtype=torch.long, device=weight.device)
    row_of[keep] = torch.arange(len(keep), device=weight.device)
    embed.weight = torch.nn.Parameter(weight.detach()[keep].clone(), requires_grad=False)
    embed.register_buffer(_ROW_OF, row_of, persistent=False)
    if getattr(embed, SPARSE_GRAD, False):  # a copy of a policy's embedding: lookups must go through the remap
        setattr(embed, SPARSE_GRAD, False)
    embed.padding_idx = None  # the pad row's index changed; it only ever shaped gradients, which a frozen one has not
    embed.forward = types.MethodType(_narrowed_forward, embed)
    return (vocab - len(keep)) * weight.shape[1] * weight.element_size() - row_of.numel() * row_of.element_size()
