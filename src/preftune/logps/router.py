"""The router load-balancing loss of mixture-of-experts models (Mixtral, Qwen3-MoE, ...), as their own forward and
TRL's DPOTrainer add it to the training loss.

The layouts run the decoder body several times per batch (per length group, prompt and answer slots apart); a
`RouterLogits` collects the router logits of the real tokens of every call, and the loss is computed once over all
of them with the model's own `load_balancing_loss_func`. It counts each answer row's sequence `prompt + answer`, so
a prompt shared by k answers counts k times, as in the plain layout and in TRL's concatenated forward.
"""

from __future__ import annotations

import sys

import torch

from ..errors import ConfigError
from .parts import unwrap


def router_aux_coef(model, coef: float | None) -> float:
    """The weight of the router loss for `model`: `coef`, or when None the model config's `router_aux_loss_coef`;
    0 for a model without router logits. Raises ConfigError for a nonzero `coef` on such a model."""
    cfg = unwrap(model).config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    if not hasattr(cfg, "output_router_logits"):
        if coef:
            raise ConfigError(f"router_aux_loss_coef: {type(unwrap(model)).__name__} is not a mixture-of-experts model "
                              f"with router logits; drop --router-aux-loss-coef")
        return 0.0
    return float(getattr(cfg, "router_aux_loss_coef", 0.0) if coef is None else coef)


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
        balance = sys.modules[type(hf).__module__].load_balancing_loss_func
        return balance(tuple(self.parts), hf.num_experts, hf.num_experts_per_tok)
