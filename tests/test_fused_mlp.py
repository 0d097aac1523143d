"""The gated MLPs that keep two tensors for backward (models/fused_mlp.py) against Hugging Face's own modules."""

from __future__ import annotations

import importlib

import pytest
import torch

from families import logits_and_grads, probe_ids, tiny
from preftune.models.fused_mlp import GATED_MLPS, use_fused_mlps, use_plain_mlps

# family -> gated MLPs a tiny model has (2 layers); Qwen3-MoE's and Mixtral's experts are of another form.
PATCHED = {"llama": 2, "mistral": 2, "qwen2-window": 2, "qwen3": 2, "gemma": 2, "gemma2": 2, "gemma3": 2,
           "olmo2": 2, "stablelm": 2, "granite": 2, "cohere": 2, "cohere2": 2}
UNTOUCHED = ["phi3-window", "gpt2", "gpt-neox", "opt", "mixtral", "qwen3-moe"]


@pytest.mark.parametrize("family", sorted(PATCHED))
def test_patched_model_gives_the_same_bits(family):
    """Forward runs the class's operations in its order and backward autograd's formulas: equal bits, fp32."""
    model = tiny(family)
    ids = probe_ids()
    plain_logits, plain_grads = logits_and_grads(model, ids)
    assert use_fused_mlps(model) == PATCHED[family]
    logits, grads = logits_and_grads(model, ids)
    assert torch.equal(logits, plain_logits)
    assert grads.keys() == plain_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, plain_grads[name]), name
    use_plain_mlps(model)
    assert all("forward" not in vars(m) for m in model.modules())


def test_mixed_precision_gives_the_same_bits():
    """Under bf16 autocast backward recomputes in bf16 as forward did, and the weight's gradient is cast back."""
    model = tiny("llama")
    ids = probe_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_logits, plain_grads = logits_and_grads(model, ids)
        use_fused_mlps(model)
        logits, grads = logits_and_grads(model, ids)
    assert torch.equal(logits, plain_logits)
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.equal(g, plain_grads[name]), name


@pytest.mark.parametrize("family", UNTOUCHED)
def test_other_mlps_are_left_alone(family):
    model = tiny(family)
    assert use_fused_mlps(model) == 0
    assert all("forward" not in vars(m) for m in model.modules())


def test_lora_and_biased_projections_keep_the_class_forward():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["down_proj"]))
    assert use_fused_mlps(model) == 0
    biased = tiny("llama", mlp_bias=True)
    assert use_fused_mlps(biased) == 0


def test_an_adapter_added_after_the_patch_still_runs():
    """The patch checks down_proj at each call: one wrapped by peft since takes the class forward, adapter and all."""
    from peft import LoraConfig, get_peft_model

    ids = probe_ids()
    model = tiny("llama")
    assert use_fused_mlps(model) == 2
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    logits, grads = logits_and_grads(peft_model, ids)
    use_plain_mlps(peft_model)
    plain_logits, plain_grads = logits_and_grads(peft_model, ids)
    assert torch.equal(logits, plain_logits)
    lora_b = [n for n in grads if "down_proj.lora_B" in n]
    assert lora_b and all(torch.equal(grads[n], plain_grads[n]) and grads[n].abs().sum() > 0 for n in lora_b)


def test_an_activation_with_weights_keeps_the_class_forward():
    """PReLU learns its slope: the fused backward would give it no gradient."""
    model = tiny("llama", hidden_act="prelu")
    assert use_fused_mlps(model) == 0


class _UpcastSilu(torch.nn.Module):
    """An activation that computes in fp32 whatever its input (as CUDA autocast runs `pow`-based GELUs)."""

    def forward(self, x):
        return torch.nn.functional.silu(x.float())


def test_an_activation_that_returns_fp32_under_autocast_gives_the_same_bits():
    """The product is then fp32 while down_proj's product runs in bf16: the gradient reaching the product must be
    cast back to fp32 before it meets `up`, as autograd's backward of the cast does."""
    model = tiny("llama")
    for layer in model.model.layers:
        layer.mlp.act_fn = _UpcastSilu()
    ids = probe_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_logits, plain_grads = logits_and_grads(model, ids)
        assert use_fused_mlps(model) == 2
        logits, grads = logits_and_grads(model, ids)
    assert torch.equal(logits, plain_logits)
    for name, g in grads.items():
        assert torch.equal(g, plain_grads[name]), name


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("family", sorted(GATED_MLPS))
def test_every_listed_class_gets_the_same_bits(family, autocast):
    """Each listed class, as the installed transformers defines it, against its own forward and autograd, in fp32
    and under bf16 autocast."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(family).get_text_config()
    config.hidden_size, config.intermediate_size = 24, 40
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    for name in GATED_MLPS[family]:
        torch.manual_seed(2)
        mlp = getattr(modeling, name)(config)
        x = torch.randn(3, 5, 24, requires_grad=True)
        params = [x, *mlp.parameters()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            plain = mlp(x)
            g = torch.randn_like(plain)
            plain_grads = torch.autograd.grad(plain, params, g)
            assert use_fused_mlps(mlp) == 1, name
            fused = mlp(x)
            grads = torch.autograd.grad(fused, params, g)
        assert torch.equal(fused, plain), name
        assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads)), name


def _saved_bytes(fn) -> int:
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def _llama_mlp():
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    torch.manual_seed(0)
    return LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=48, num_attention_heads=4, hidden_act="silu"))


def test_half_the_intermediate_tensors_are_kept():
    """What the change is for: per token, the plain MLP keeps four rows of the intermediate width (gate,
    act(gate), up, the product) and the fused one two, besides the input both keep for the gate and up."""
    mlp = _llama_mlp()
    x = torch.randn(2, 10, 16, requires_grad=True)
    plain = _saved_bytes(lambda: mlp(x))
    use_fused_mlps(mlp)
    fused = _saved_bytes(lambda: mlp(x))
    row = 2 * 10 * 48 * 4  # one [tokens, intermediate] float32 tensor
    assert plain - fused == 2 * row


def test_calls_without_autograd_skip_the_function_and_frozen_weights_take_it(monkeypatch):
    """No autograd: the class's arithmetic without the Function. Frozen weights with an input that needs its
    gradient: the Function, giving the input the class's gradient."""
    from preftune.models import fused_mlp

    calls = []
    apply = fused_mlp._GatedDown.apply
    monkeypatch.setattr(fused_mlp._GatedDown, "apply", lambda *a: calls.append(1) or apply(*a))
    mlp = _llama_mlp()
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        plain_out = mlp(x)
        use_fused_mlps(mlp)
        assert torch.equal(mlp(x), plain_out) and not calls
    for p in mlp.parameters():
        p.requires_grad_(False)
    gx = x.clone().requires_grad_()
    (fused,) = torch.autograd.grad(mlp(gx).sum(), gx)
    assert calls == [1]
    use_plain_mlps(mlp)
    (plain,) = torch.autograd.grad(mlp(gx).sum(), gx)
    assert torch.equal(fused, plain)


def test_a_down_proj_with_a_forward_of_its_own_keeps_the_class_forward():
    """A hook library (accelerate) may give a layer an instance forward: the fused path would bypass it."""
    mlp = _llama_mlp()
    mlp.down_proj.forward = lambda x: torch.nn.functional.linear(x, mlp.down_proj.weight) * 2
    assert use_fused_mlps(mlp) == 0


def test_training_with_and_without_the_switch_gives_the_same_run(tiny_model_dir):
    from tinylm import train_switched

    runs = train_switched(tiny_model_dir, "fused_mlps", "LlamaMLP")
    for fused, (_, during, after) in runs.items():
        assert during == [fused] * 2
        assert not after  # the caller's model is plain again
    on, off = runs[True][0], runs[False][0]
    assert [r["loss"] for r in on.history] == [r["loss"] for r in off.history]
    assert [r["grad_norm"] for r in on.history] == [r["grad_norm"] for r in off.history]
    assert on.history[-1]["loss"] != on.history[0]["loss"]


def test_a_lora_run_trains_its_down_proj_adapters_either_way(tiny_model_dir):
    """LoRA's default targets wrap down_proj: those MLPs keep their own forward, and the adapters there train."""
    from tinylm import fact_pairs

    import preftune

    settings = {"max_steps": 3, "batch_size": 4, "lr": 3e-3, "max_length": 64, "device": "cpu", "dtype": "float32",
                "seed": 3, "warmup_steps": 0, "lora_r": 4}
    runs = {fused: preftune.train("dpo", model=str(tiny_model_dir), data=fact_pairs(16), fused_mlps=fused,
                                  **settings) for fused in (True, False)}
    assert [r["loss"] for r in runs[True].history] == [r["loss"] for r in runs[False].history]
    for result in runs.values():
        lora_b = [p for n, p in result.model.named_parameters() if "down_proj.lora_B" in n]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
