"""The fused RMS norms (models/fused.py) against Hugging Face's own modules and a float64 hand computation."""

from __future__ import annotations

import pytest
import torch

from families import logits_and_grads, probe_ids, tiny
from preftune.models.fused import LLAMA_STYLE_NORMS, rms_norm, use_fused_norms, use_plain_norms

# family -> norms a tiny model has: 2 layers x (input, post-attention) + final, and Qwen3's q/k norms.
PATCHED = {"llama": 5, "mistral": 5, "qwen2-window": 5, "qwen3": 9, "phi3-window": 5, "granite": 5,
           "mixtral": 5, "qwen3-moe": 9}
# Norms of other formulas: Gemma's (1 + weight), OLMo-2's (weight applied before the cast), Cohere's layer norm.
UNTOUCHED = ["gemma", "gemma2", "olmo2", "cohere", "stablelm"]


def _hf_formula(x, weight, eps):
    """LlamaRMSNorm.forward as transformers writes it, run by autograd in whatever dtype it is given."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("family", sorted(PATCHED))
def test_patched_model_equals_the_unpatched_one(family):
    model = tiny(family)
    ids = probe_ids()
    plain_logits, plain_grads = logits_and_grads(model, ids)
    assert use_fused_norms(model) == PATCHED[family]
    logits, grads = logits_and_grads(model, ids)
    # The forward does the same float32 arithmetic in the same order: the logits are the same bits.
    assert torch.equal(logits, plain_logits)
    assert grads.keys() == plain_grads.keys()
    for name, g in grads.items():
        scale = plain_grads[name].abs().max().clamp_min(1e-12)
        assert (g - plain_grads[name]).abs().max() / scale < 1e-5, name
    norm_grads = [n for n in grads if "norm" in n]
    assert len(norm_grads) == PATCHED[family]  # the norm weights themselves receive (equal) gradients
    use_plain_norms(model)
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("family", UNTOUCHED)
def test_other_norm_formulas_are_left_alone(family):
    model = tiny(family)
    assert use_fused_norms(model) == 0
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("family", sorted(LLAMA_STYLE_NORMS))
def test_every_listed_class_gets_the_same_numbers(family):
    """Each listed class, as the installed transformers defines it, against its own forward and autograd."""
    import importlib

    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    for name in LLAMA_STYLE_NORMS[family]:
        torch.manual_seed(2)
        norm = getattr(modeling, name)(24, eps=1e-5)
        with torch.no_grad():
            norm.weight.normal_()
        x = (torch.randn(3, 6, 24) * 4).requires_grad_()
        g = torch.randn(3, 6, 24)
        plain = norm(x)
        plain_gx, plain_gw = torch.autograd.grad(plain, (x, norm.weight), g)
        assert use_fused_norms(norm) == 1
        fused = norm(x)
        gx, gw = torch.autograd.grad(fused, (x, norm.weight), g)
        assert torch.equal(fused, plain), name
        assert (gx - plain_gx).abs().max() / plain_gx.abs().max() < 1e-5, name
        assert (gw - plain_gw).abs().max() / plain_gw.abs().max() < 1e-5, name


def test_gradients_equal_a_float64_hand_computation():
    torch.manual_seed(0)
    x64 = (torch.randn(4, 7, 16, dtype=torch.float64) * 3).requires_grad_()
    w64 = torch.randn(16, dtype=torch.float64, requires_grad=True)
    g64 = torch.randn(4, 7, 16, dtype=torch.float64)
    ref_y = _hf_formula(x64, w64, 1e-6)
    ref_gx, ref_gw = torch.autograd.grad(ref_y, (x64, w64), g64)

    x = x64.detach().float().requires_grad_()
    w = w64.detach().float().requires_grad_()
    y = rms_norm(x, w, 1e-6)
    gx, gw = torch.autograd.grad(y, (x, w), g64.float())
    for got, want in ((y, ref_y), (gx, ref_gx), (gw, ref_gw)):
        assert (got.double() - want).abs().max() / want.abs().max() < 2e-6


def test_a_non_contiguous_input_and_a_frozen_weight():
    """Qwen3 normalises a transposed view of its heads; a reference's norm weight needs no gradient."""
    torch.manual_seed(1)
    base = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    x64 = base.transpose(1, 2).requires_grad_()  # [2, 3, 5, 8], not contiguous
    w64 = torch.randn(8, dtype=torch.float64)
    g64 = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    (ref_gx,) = torch.autograd.grad(_hf_formula(x64, w64, 1e-5), (x64,), g64)
    x = x64.detach().float().requires_grad_()
    (gx,) = torch.autograd.grad(rms_norm(x, w64.float(), 1e-5), (x,), g64.float())
    assert (gx.double() - ref_gx).abs().max() / ref_gx.abs().max() < 2e-6


def test_other_dtypes_keep_the_class_forward():
    model = tiny("llama").to(torch.bfloat16)
    ids = probe_ids()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        use_fused_norms(model)
        fused = model(input_ids=ids).logits
    assert torch.equal(fused, plain)


def test_patching_twice_and_copying():
    import copy

    model = tiny("llama")
    assert use_fused_norms(model) == use_fused_norms(model) == 5
    twin = copy.deepcopy(model)
    norm = twin.model.norm
    assert vars(norm)["forward"].__self__ is norm  # the copy's forward is bound to the copy, not the original
    ids = probe_ids()
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_training_with_and_without_the_switch_gives_the_same_run(tiny_model_dir):
    from tinylm import train_switched

    runs = train_switched(tiny_model_dir, "fused_norms", "LlamaRMSNorm")
    for fused, (_, during, after) in runs.items():
        assert during == [fused] * 5
        assert not after  # the caller's model is plain again
    on, off = runs[True][0], runs[False][0]
    assert [r["step"] for r in on.history] == [r["step"] for r in off.history] == [1, 2, 3]
    for a, b in zip(on.history, off.history):
        for key in ("loss", "chosen_logp", "rejected_logp", "chosen_reward", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert on.history[-1]["loss"] != on.history[0]["loss"]  # the weights moved, so later steps compare trained models
    trained, plain = on.model.state_dict(), off.model.state_dict()
    assert all(torch.allclose(trained[k], plain[k], rtol=1e-4, atol=1e-6) for k in plain)
