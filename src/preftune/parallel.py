"""FSDP2 under torchrun: shard a model's weights across ranks, and gather them back whole for saving.

Units: every decoder layer is its own FSDP unit (its weights are gathered just before it runs and freed
after); the root unit is the module whose forward computes answer log-probs (`logprobs.AnswerLogpModule`'s
inner module), and holds the rest: embeddings, final norm, output projection. The root cannot be the
Hugging Face model itself: answer log-probs call the decoder body and the output projection directly,
never the model's own forward, so only a forward through the wrapping module gathers those weights (and
keeps tied input/output embeddings in one unit).

Gradients are reduce-scattered with a mean over ranks, as DDP all-reduces them with a mean, so the
training loop's scaling (each rank's loss sum times world / global count) holds for both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import ModelError


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a causal LM's decoder (`layers` in most families, `h` in GPT-2 style ones)."""
    from .logprobs import body_of

    body = body_of(model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise ModelError(f"{type(body).__name__}: cannot find its decoder layers to shard with --fsdp")


def shard(root: torch.nn.Module, model, *, frozen: bool = False) -> torch.nn.Module:
    """Apply FSDP2 to `model`'s decoder layers and to `root` (a module containing `model`), in place.

    The weights may be on the CPU: each rank keeps only its shard and moves it to its own device.
    A frozen model (the reference, run under no_grad) also frees the root's gathered weights after each
    forward; a trained one keeps them until backward, which needs them at once.
    """
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh, reshard_after_forward=True if frozen else None)
    return root


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded one (a DTensor, e.g. a gradient norm under FSDP)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every weight of a sharded `model`, whole and on the CPU, on rank 0 (other ranks get an empty dict).

    A collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
