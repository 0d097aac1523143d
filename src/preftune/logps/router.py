"""The router load-balancing loss of mixture-of-experts models (Mixtral, Qwen3-MoE, ...), as their own forward and
TRL's DPOTrainer add it to the training loss.

The layouts run the decoder body several times per batch (per length group, prompt and answer slots apart); a
`RouterLogits` collects the router logits of the real tokens of every call, and the loss is computed once over all
of them with the model's own `load_balancing_loss_func`. It counts each answer row's sequence `prompt + answer`, so
a prompt shared by k answers counts k times, as in the plain layout and in TRL's concatenated forward.
"""

from __future__ import annotations

import logging
import sys

import torch

from ..errors import ConfigError
from .parts import unwrap

log = logging.getLogger(__name__)


def router_aux_coef(model, coef: float | None) -> float:
    """The weight of the router loss for `model`: `coef`, or when None the model config's `router_aux_loss_coef`;
    0 for a model without router logits. Raises ConfigError for a nonzero `coef` on such a model."""
    cfg = unwrap(model).config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    name = type(unwrap(model)).__name__
    if not hasattr(cfg, "output_router_logits"):
        if coef:
            raise ConfigError(f"router_aux_loss_coef: {name} is not a mixture-of-experts model with router logits; "
                              f"drop --router-aux-loss-coef")
        return 0.0
    if _balance_of(model) is None:  # Llama 4, DeepSeek-V3, ...: router logits, but no load-balancing loss to add
        if coef:
            raise ConfigError(f"router_aux_loss_coef: {name}'s modeling code has no load-balancing loss "
                              "(load_balancing_loss_func) to weigh; drop --router-aux-loss-coef")
        if getattr(cfg, "router_aux_loss_coef", 0.0):
            log.warning("%s: its config weighs a router loss its modeling code does not define; trained without "
                        "one", name)
        return 0.0
    return float(getattr(cfg, "router_aux_loss_coef", 0.0) if coef is None else coef)


def _balance_of(model):
    """The model's own `load_balancing_loss_func` (from its modeling module), or None."""
    hf = unwrap(model)
    hf = hf.get_base_model() if hasattr(hf, "get_base_model") else hf  # under LoRA adapters
    return getattr(sys.modules[type(hf).__module__], "load_balancing_loss_func", None)


class RouterLogits:
    """Router logits of real tokens, gathered over the decoder body calls of one batch."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []  # [tokens, experts] each; layers and calls alike, since the loss pools

    def add(self, out, real: torch.Tensor, times: int = 1) -> None:
        """Keep the router logits of `out` (a body output asked for them) at the positions where `real` [B, S] is
        True, counted `times` times."""
        flat = real.reshape(-1)
        for layer in out.router_logits:
            self.parts.extend([layer[flat]] * times)

    def loss(self, model) -> torch.Tensor:
        """The load-balancing loss over every token gathered: the mean over tokens and layers of top-k assignments
        per expert, times the mean router probability per expert, summed over experts, times their number."""
        hf = unwrap(model)
        hf = hf.get_base_model() if hasattr(hf, "get_base_model") else hf  # under LoRA adapters
        return _balance_of(model)(tuple(self.parts), hf.num_experts, hf.num_experts_per_tok)
