"""Where and in which dtypes a run computes: the device, and the dtypes of trained weights, frozen weights and
forwards (mixed precision)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, ModelError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """CUDA > MPS > CPU for `auto`; an explicit device that is not there is an error, not a silent fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is visible; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("--device mps: MPS is not available here; use --device auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ModelError(f"--device {name}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None


@dataclass(frozen=True)
class Precision:
    """Dtypes of a run. `trained`: weights the optimizer updates; `frozen`: weights it never touches (the
    reference, a LoRA base); `compute`: the autocast dtype of forwards, None to compute in the weights' dtype."""

    trained: torch.dtype
    frozen: torch.dtype
    compute: torch.dtype | None = None


def pick_precision(name: str, device: torch.device) -> Precision:
    """`auto` is `mixed` on GPUs with bf16 and float32 elsewhere (CPU bf16 matmuls are slow).

    `mixed` keeps trained weights and optimizer state in fp32 and computes in bf16: a DPO update at lr 5e-7 is
    far below a bf16 weight's spacing, so pure bf16 weights would drop most updates. Frozen weights are held in
    bf16, which halves the reference's memory. `bfloat16`/`float16`/`float32` hold every weight in that dtype.
    """
    if name == "auto":
        name = "mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name == "mixed":
        return Precision(torch.float32, torch.bfloat16, torch.bfloat16)
    if name not in _DTYPES:
        raise ConfigError(f"--dtype {name}: not one of auto, mixed, {', '.join(_DTYPES)}")
    return Precision(_DTYPES[name], _DTYPES[name])


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to load a model in for inference (eval, generate): the frozen dtype of `pick_precision`."""
    return pick_precision(name, device).frozen



def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating-point parameters to `dtype`, buffers left as they are: `from_pretrained(dtype=...)` keeps a rotary
    embedding's `inv_freq` in fp32, and `model.to(dtype)` would round it, moving every position's angle (a bf16
    reference beside a policy loaded in bf16 then starts off log 2). Tied parameters stay one tensor."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def hold_frozen(model, precision: Precision) -> None:
    """Store a frozen copy (loaded in `precision.trained`) the way it must be held to compute what the policy does.

    Without autocast the frozen copy is simply held in `precision.frozen`. Under autocast (mixed precision) the
    policy keeps fp32 weights, so its embeddings, norms and residual stream run in fp32 while each matrix product
    casts its weight to the compute dtype. A reference held wholly in bf16 would run its residual stream in bf16 and
    differ from the policy it starts equal to (a first DPO loss of 0.6918 instead of log 2 on a 0.5B model). So only
    the weights that autocast casts anyway, those of linear layers, are stored in the compute dtype, bit for bit what
    the cast gives; the rest stays in the trained dtype. A linear layer whose weight is also the input embedding (tied
    embeddings) stays whole.
    """
    if precision.compute is None:
        cast_weights(model, precision.frozen)
        return
    tied = {id(model.get_input_embeddings().weight)} if hasattr(model, "get_input_embeddings") else set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in tied:
            module.to(precision.compute)
