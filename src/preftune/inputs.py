"""Objects a run is given in place of paths: a model, a tokenizer, a reference model, records in memory.

`TrainConfig` holds paths (strings); a run started from Python may instead hold the objects themselves. The
config then names them with a placeholder (`<in-memory LlamaForCausalLM>`), so the saved config and model card
say what was trained without pretending a path reproduces it.

Objects are used in place, as TRL does: a model passed in is moved to the run's device and trained where it
is; a reference model passed in is frozen (eval mode, no gradients). With no reference given, the reference
is a frozen copy of the model made once, before training (or, for a peft model, the model with its adapters
switched off).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError
from .models.precision import Precision, cast_weights, hold_frozen


@dataclass
class RunInputs:
    """What a run uses instead of the config's paths; None means: load it from the path in the config."""

    model: torch.nn.Module | None = None
    tokenizer: Any = None
    ref_model: torch.nn.Module | None = None
    data: Any = None        # data.memory.InMemory
    eval_data: Any = None   # data.memory.InMemory


def placeholder(obj: Any) -> str:
    """How the config names an object it cannot hold: `<in-memory LlamaForCausalLM>`."""
    return f"<in-memory {type(obj).__name__}>"


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def carries_injected_adapters(model: torch.nn.Module) -> bool:
    """True for a plain model that peft changed in place: the base inside an earlier LoRA run's peft model."""
    return not is_peft_model(model) and any(type(m).__module__.startswith("peft.") for m in model.modules())


def check_model_object(model: Any, what: str) -> torch.nn.Module:
    """A causal LM object (transformers or peft), or a `ConfigError` saying what was passed."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{what}: expected a transformers model, a peft model, or a path / Hub id; got "
                          f"{type(model).__name__}")
    if any(t.is_meta for t in model.parameters()):
        raise ConfigError(f"{what}: its weights are on the meta device (built without loading them); load the "
                          f"model with from_pretrained, or pass its path")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ConfigError(f"{what}: a quantized model object cannot be used yet; pass its path with "
                          f"load_in_4bit=True and lora_r set")
    return model


def policy_in_place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model to train, moved to `device`; a plain model is also cast to `dtype`, as if loaded in it.

    A peft model keeps its dtypes (peft holds adapters in fp32 over a base that may be lower precision)."""
    model.to(device)
    if not is_peft_model(model):
        cast_weights(model, dtype)
    return model


def frozen(model: torch.nn.Module, device: torch.device, precision: Precision, *, copied: bool) -> torch.nn.Module:
    """A reference model: a copy of `model` (copied=True) or `model` itself, on `device`, frozen, and held in
    `precision` as a reference loaded from a path is (`hold_frozen`)."""
    ref = copy.deepcopy(model) if copied else model
    ref.to(device)
    cast_weights(ref, precision.trained)
    hold_frozen(ref, precision)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
