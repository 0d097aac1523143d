"""The parts of a Hugging Face causal LM that answer log-probs use directly, and the dtype they compute in.

The model's own forward is never called: the decoder body runs on embeddings, and only the answer positions go
through the output head (see projection.py).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch


class LMWrapper(torch.nn.Module):
    """Base of preftune's own modules around a causal LM (held as `.model`); `unwrap` sees through them."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def unwrap(model):
    """The Hugging Face model under DDP/compile wrappers and preftune's own (the log-prob module)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod") or isinstance(model, LMWrapper):
        if isinstance(model, LMWrapper):
            model = model.model
        else:
            model = getattr(model, "module", None) or model._orig_mod
    return model


# Set on a decoder body whose layers are compiled: the plain layout pads each call's width up to a multiple of it.
# A compiled graph is specialised on whether a width is a multiple of 8 (memory alignment); arbitrary widths
# would recompile it every few batches.
WIDTH_MULTIPLE = "_preftune_width_multiple"


def width_multiple(model) -> int:
    """What the plain layout rounds each call's sequence width up to for this model (1: nothing)."""
    return getattr(body_of(model), WIDTH_MULTIPLE, 1)


# Set on an input embedding whose lookups should give its weight a row-sparse gradient (see `embed_tokens`).
SPARSE_GRAD = "_preftune_sparse_grad"


def sparse_embedding_grad(model, on: bool) -> bool:
    """Let `model`'s token lookups give a row-sparse gradient when `on` and the embedding allows it; returns
    whether they will.

    A batch looks up a few thousand of the vocabulary's rows, but the dense gradient of an embedding is the
    whole [vocab, hidden] matrix, zero-filled on every step (155 MB for a 151,936-token vocabulary at hidden
    256). Allowed for a plain `nn.Embedding` that trains and is not tied to the output head (whose gradient is
    dense anyway); `training.optim.AdamW` steps such a gradient exactly as a dense one.
    """
    hf = unwrap(model)
    embed = hf.get_input_embeddings()
    head = hf.get_output_embeddings()
    allowed = (type(embed) is torch.nn.Embedding and embed.weight.requires_grad and embed.max_norm is None
               and not embed.scale_grad_by_freq and (head is None or head.weight is not embed.weight))
    if isinstance(embed, torch.nn.Module):
        setattr(embed, SPARSE_GRAD, bool(on and allowed))
    return bool(on and allowed)


def embed_tokens(model, ids: torch.Tensor) -> torch.Tensor:
    """The token embeddings of `ids`, with a row-sparse weight gradient where `sparse_embedding_grad` set it."""
    embed = unwrap(model).get_input_embeddings()
    if getattr(embed, SPARSE_GRAD, False):
        return torch.nn.functional.embedding(ids, embed.weight, embed.padding_idx, sparse=True)
    return embed(ids)


class Head:
    """The output projection of a causal LM, with the logit transforms some architectures apply after it."""

    def __init__(self, model):
        hf = unwrap(model)
        self.linear = hf.get_output_embeddings()
        cfg = hf.config
        # Gemma 2/3, RecurrentGemma and xLSTM cap the logits by tanh, under three names
        self.softcap = next((getattr(cfg, name) for name in ("final_logit_softcapping", "logits_soft_cap",
                                                              "output_logit_soft_cap") if getattr(cfg, name, None)),
                            None)
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


def text_config(model):
    """The config of `model`'s text decoder (a multimodal model's text part; else the model's own)."""
    cfg = unwrap(model).config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def body_of(model):
    """The decoder stack (everything before the output projection)."""
    hf = unwrap(model)
    # `get_decoder` falls back to the model itself where `base_model_prefix` names no attribute (Llama 4's text
    # model keeps its body as `.model`)
    found = (hf.get_decoder() if hasattr(hf, "get_decoder") else None,
             getattr(hf, hf.base_model_prefix, None), getattr(hf, "model", None))
    body = next((m for m in found if m is not None and m is not hf), None)
    if body is None:
        raise TypeError(f"{type(hf).__name__}: cannot find the decoder body")
    return body


def cache_kwarg(body) -> str:
    """The name the body's forward takes a key/value cache under (`cache`, or the older `past_key_values`)."""
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def checkpointing(model) -> bool:
    """Whether a training forward of `model` now recomputes its layers in backward (activation checkpointing)."""
    hf = unwrap(model)
    if not (hf.training and torch.is_grad_enabled()):
        return False
    on = getattr(hf, "is_activation_checkpointing", None)  # the newer name of `is_gradient_checkpointing`
    return bool(on if on is not None else getattr(hf, "is_gradient_checkpointing", False))


def compute_precision(model):
    """Autocast to the compute dtype `set_compute_dtype` gave the model (mixed precision), else nothing."""
    hf = unwrap(model)
    dtype = getattr(hf, "preftune_compute_dtype", None)
    if dtype is None:
        return nullcontext()
    return torch.autocast(next(hf.parameters()).device.type, dtype=dtype)


def set_compute_dtype(model, dtype: torch.dtype | None) -> None:
    """Compute `model`'s forwards under autocast to `dtype` (its weights keep their own dtype)."""
    unwrap(model).preftune_compute_dtype = dtype



def attention_backends(device: torch.device):
    """On CUDA, scaled-dot-product attention without the cuDNN backend; elsewhere nothing.

    cuDNN builds an execution plan for every new shape it meets, and the batches of a run seldom repeat a shape:
    on an H100 (torch 2.11) each such call cost 2-4 ms of host time, and turning the backend off took a 0.5B
    model's DPO step from 7.6 to 19.8 pairs/s (benchmarks/results/gpu-h100/). Flash and memory-efficient
    attention compute the same function.
    """
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
