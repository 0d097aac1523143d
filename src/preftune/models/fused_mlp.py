"""Gated MLPs that keep two [tokens, intermediate] tensors for backward instead of four: the same numbers.

A Llama-style MLP is `down_proj(act(gate_proj(x)) * up_proj(x))`. Autograd keeps, per token and layer, the
gate's output (for `act`'s backward), `act(gate)` and the up projection (for the product's), and the product (for
`down_proj`'s weight gradient): four rows of the intermediate width, which is 2.7x to 5.4x the hidden width. In
a small model's training step they are most of what the decoder holds between forward and backward (Qwen2-0.5B:
4 x 4,864 against ~8 x 896 for attention and norms per token and layer). `use_fused_mlps(model)` gives each MLP
of that exact formula a forward that keeps only the gate and the up projection, and recomputes `act(gate)` and
the product in backward: two elementwise passes more, against half the MLP's activation memory.

Forward runs the same operations in the same order, so its output is bit for bit the class's; backward runs
autograd's own formulas (the activation's backward is autograd's, applied to the recomputed value), so gradients
equal it too. It works on those module instances only, and only where `down_proj` is a plain bias-free
`nn.Linear` (not a LoRA or quantized layer, checked at each call) and the activation has no weights: other MLPs
keep their own forward.
"""

from __future__ import annotations

import torch

from .fused import patch_forward, unpatch_forward

# MLP classes whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))` (read off transformers 5.24),
# by the transformers.models package that defines them. Phi-3's fused gate_up_proj, Mixtral's experts and every
# other variant are not here, so their modules keep their own forward.
GATED_MLPS: dict[str, tuple[str, ...]] = {
    "llama": ("LlamaMLP",), "mistral": ("MistralMLP",), "ministral": ("MinistralMLP",),
    "ministral3": ("Ministral3MLP",), "qwen2": ("Qwen2MLP",), "qwen2_moe": ("Qwen2MoeMLP",), "qwen3": ("Qwen3MLP",),
    "qwen3_moe": ("Qwen3MoeMLP",), "gemma": ("GemmaMLP",), "gemma2": ("Gemma2MLP",), "gemma3": ("Gemma3MLP",),
    "granite": ("GraniteMLP",), "olmo": ("OlmoMLP",), "olmo2": ("Olmo2MLP",), "olmo3": ("Olmo3MLP",),
    "olmoe": ("OlmoeMLP",), "cohere": ("CohereMLP",), "cohere2": ("Cohere2MLP",), "helium": ("HeliumMLP",),
    "stablelm": ("StableLmMLP",), "smollm3": ("SmolLM3MLP",), "deepseek_v2": ("DeepseekV2MLP",),
    "deepseek_v3": ("DeepseekV3MLP",), "dots1": ("Dots1MLP",), "ernie4_5": ("Ernie4_5MLP",),
    "exaone4": ("Exaone4MLP",), "glm4_moe": ("Glm4MoeMLP",), "hunyuan_v1_dense": ("HunYuanDenseV1MLP",),
    "hunyuan_v1_moe": ("HunYuanMoEV1MLP",), "diffllama": ("DiffLlamaMLP",), "csm": ("CsmMLP",),
}
_QUALIFIED = frozenset(f"transformers.models.{family}.modeling_{family}.{name}"
                       for family, names in GATED_MLPS.items() for name in names)


class _GatedDown(torch.autograd.Function):
    """down(act(gate) * up) from the gate and up projections' outputs, keeping only those two for backward."""

    @staticmethod
    def forward(ctx, gate, up, weight, act):
        ctx.act = act
        dev = gate.device.type
        ctx.amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        ctx.save_for_backward(gate, up, weight)
        return torch.nn.functional.linear(act(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        need_gate, need_up, need_w = ctx.needs_input_grad[:3]
        with torch.autocast(gate.device.type, dtype=ctx.amp, enabled=ctx.amp is not None):
            with torch.enable_grad():
                g = gate.detach().requires_grad_(need_gate)
                a = ctx.act(g)
            act = a.detach()
            grad_w = None
            if need_w:  # the product only for the weight's gradient (a frozen down_proj, as under LoRA, skips it)
                # autograd's linear backward: the weight's gradient as grad^T input
                product = act * up
                flat = grad.reshape(-1, grad.shape[-1])
                grad_w = flat.t().mm(product.reshape(-1, product.shape[-1])).to(weight.dtype)
            # in the product's dtype, as autograd's backward of autocast's cast gives it (an activation that
            # autocast runs in fp32 makes the product fp32 while its matrix product runs in bf16)
            grad_p = grad.matmul(weight).to(torch.result_type(act, up)) if (need_gate or need_up) else None
            grad_up = grad_p * act if need_up else None
            grad_gate = torch.autograd.grad(a, g, grad_p * up)[0] if need_gate else None
        return grad_gate, grad_up, grad_w, None


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not _plain_linear(self.down_proj):  # wrapped since (LoRA adapters added after the patch): its own forward
        return type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad or self.down_proj.weight.requires_grad):
        return _GatedDown.apply(gate, up, self.down_proj.weight, self.act_fn)
    return self.down_proj(self.act_fn(gate) * up)


def _plain_linear(module) -> bool:
    return (type(module) is torch.nn.Linear and module.bias is None and type(module.weight.data) is torch.Tensor
            and not module._forward_hooks and not module._forward_pre_hooks and "forward" not in vars(module))


def is_gated_mlp(module: torch.nn.Module) -> bool:
    """One of the listed classes, with a plain `down_proj` and an activation without weights of its own (PReLU's
    and xIELU's would get no gradient through the fused backward)."""
    cls = type(module)
    act = getattr(module, "act_fn", None)
    weightless = callable(act) and not (isinstance(act, torch.nn.Module) and any(True for _ in act.parameters()))
    return (f"{cls.__module__}.{cls.__qualname__}" in _QUALIFIED and weightless
            and _plain_linear(getattr(module, "down_proj", None)))


def use_fused_mlps(model: torch.nn.Module) -> int:
    """Give `model`'s gated MLPs the forward that keeps two tensors for backward; returns how many. Idempotent."""
    return patch_forward(model, is_gated_mlp, _fused_forward)


def use_plain_mlps(model: torch.nn.Module) -> None:
    """Undo `use_fused_mlps`: every MLP runs its class's forward again."""
    unpatch_forward(model, _fused_forward)
