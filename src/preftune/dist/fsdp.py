"""FSDP2 under torchrun: shard a model's weights across ranks, and gather them back whole for saving.

Units: every decoder layer is its own FSDP unit (its weights are gathered just before it runs and freed
after); the root unit is the module whose forward computes answer log-probs (`logps.answer.LogpsForward`,
wrapped by `logp_module.AnswerLogpModule`), and holds the rest: embeddings, final norm, output projection.
The root cannot be the Hugging Face model itself: answer log-probs call the decoder body and the output
projection directly, never the model's own forward, so only a forward through the wrapping module gathers
those weights (and keeps tied input/output embeddings in one unit).

Gradients are reduce-scattered with a mean over ranks, as DDP all-reduces them with a mean, so the
training loop's scaling (each rank's loss sum times world / global count) holds for both.

Checkpoints hold whole tensors in the layout of a single process (see training/checkpoint.py): saving
gathers each trained tensor and its optimizer state onto rank 0's CPU, one tensor at a time; loading lets
rank 0 alone read the files and broadcasts them tensor by tensor, every rank keeping only its shard. So host
memory holds one whole copy (on rank 0), not one per process, and a checkpoint does not depend on the number
of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import ModelError
from ..logps.parts import body_of


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a causal LM's decoder (`layers` in most families, `h` in GPT-2 style ones)."""
    body = body_of(model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise ModelError(f"{type(body).__name__}: cannot find its decoder layers to shard with --fsdp")


def fully_shard_model(root: torch.nn.Module, model, *, frozen: bool = False) -> torch.nn.Module:
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
    return value.full_tensor() if is_sharded(value) else value


def is_sharded(value: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def local_part(value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a DTensor); a plain tensor as it is."""
    return value.to_local() if is_sharded(value) else value


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every weight of a sharded `model`, whole and on the CPU, on rank 0 (other ranks get an empty dict).

    A collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _whole_on_rank0(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def _from_rank0(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, **extra)


def full_trainable_state(model) -> dict[str, torch.Tensor]:
    """{name: whole tensor on the CPU} of the trained parameters of a sharded `model`, named as
    `model.named_parameters()` names them (a tied weight once), on rank 0; {} on the others. A collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    gathered = get_model_state_dict(model, options=_whole_on_rank0(ignore_frozen_params=True))
    if not gathered:
        return {}
    return {name: gathered[name].contiguous() for name, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(model, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state of a sharded `model`, whole, on rank 0's CPU, in the layout of `optimizer.state_dict()`
    in a single process (parameters numbered in the order of the param groups); {} on the other ranks."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_whole_on_rank0())
    if not by_name:
        return {}
    # The groups list parameter names in the optimizer's own order: their position is the single-process id.
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    number = {name: i for i, name in enumerate(names)}
    groups, first = [], 0
    for group in by_name["param_groups"]:
        groups.append({**group, "params": list(range(first, first + len(group["params"])))})
        first += len(group["params"])
    return {"state": {number[name]: value for name, value in by_name["state"].items()}, "param_groups": groups}


def optimizer_param_names(model, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer updates, in the numbering of its state dict."""
    name_of = {p: name for name, p in model.named_parameters()}
    return [name_of[p] for group in optimizer.param_groups for p in group["params"]]


def load_full_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Scatter whole trained tensors (read on rank 0; {} on the others) into the shards of `model`. A collective.
    Frozen weights keep their values."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_from_rank0(strict=False))


def load_full_optimizer_state(model, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Scatter a single-process optimizer state dict (read on rank 0; {} on the others) into the sharded
    `optimizer`. A collective."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    by_name = {}
    if state:
        names = optimizer_param_names(model, optimizer)
        by_name = {"state": {names[i]: value for i, value in state["state"].items()},
                   "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                    for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=_from_rank0())
