"""Tiny random models of the Hugging Face families people fine-tune, built from their config classes.

Each entry names what the family adds to a plain Llama-style decoder, so the matrix in test_families.py covers
every such feature: sliding windows, logit soft-capping, scaling and division, tied embeddings, absolute
positions, partial rotary, ALiBi, qk-norm, mixtures of experts and rope whose factors depend on the length.
"""

from __future__ import annotations

import torch

VOCAB = 128
WINDOW = 16  # sliding windows: the test pairs run inside and past it
ORIGINAL_MAX = 16  # longrope's `original_max_position_embeddings`: the test pairs run on both sides of it

_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ROPE_SHORT = [1.0, 1.0, 1.0, 1.0]
_ROPE_LONG = [1.0, 3.0, 7.0, 20.0]  # clearly different factors, so the wrong set shows in the numbers


def _longrope():
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": _ROPE_SHORT, "long_factor": _ROPE_LONG,
            "original_max_position_embeddings": ORIGINAL_MAX}


def _entries():
    import transformers as t

    d = _DECODER
    heads = {k: d[k] for k in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")}
    return {
        # name: (config class, model class, config kwargs, features)
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, d, "rope, grouped-query attention"),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, {**d, "sliding_window": WINDOW}, "sliding window"),
        "qwen2-window": (t.Qwen2Config, t.Qwen2ForCausalLM,
                         {**d, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0},
                         "sliding window on every layer, attention bias"),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, {**d, "head_dim": 8}, "qk-norm"),
        "gemma": (t.GemmaConfig, t.GemmaForCausalLM, {**d, "head_dim": 8}, "tied embeddings, scaled embeddings"),
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM,
                   {**d, "head_dim": 8, "sliding_window": WINDOW, "final_logit_softcapping": 5.0,
                    "attn_logit_softcapping": 10.0},
                   "alternating sliding window, logit and attention soft-capping"),
        "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM,
                   {**d, "head_dim": 8, "sliding_window": WINDOW, "layer_types": ["sliding_attention",
                                                                                  "full_attention"]},
                   "sliding window, qk-norm, local rope base"),
        "phi": (t.PhiConfig, t.PhiForCausalLM, {**d, "partial_rotary_factor": 0.5, "resid_pdrop": 0.0},
                "partial rotary, parallel attention, biased head"),
        "phi3-window": (t.Phi3Config, t.Phi3ForCausalLM, {**d, "sliding_window": WINDOW}, "sliding window"),
        "phi3-longrope": (t.Phi3Config, t.Phi3ForCausalLM,
                          {**d, "rope_scaling": _longrope(), "original_max_position_embeddings": ORIGINAL_MAX},
                          "longrope: factors switch past original_max_position_embeddings"),
        "gpt2": (t.GPT2Config, t.GPT2LMHeadModel,
                 {**heads, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
                 "absolute positions, tied embeddings, dropout 0.1"),
        "gpt-neox": (t.GPTNeoXConfig, t.GPTNeoXForCausalLM,
                     {**d, "rotary_pct": 0.25, "use_parallel_residual": True}, "partial rotary, parallel residual"),
        "olmo2": (t.Olmo2Config, t.Olmo2ForCausalLM, d, "qk-norm, norm after blocks"),
        "stablelm": (t.StableLmConfig, t.StableLmForCausalLM, {**d, "partial_rotary_factor": 0.25},
                     "partial rotary, layer norm"),
        "granite": (t.GraniteConfig, t.GraniteForCausalLM,
                    {**d, "logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                     "attention_multiplier": 0.3}, "logit division, multipliers"),
        "cohere": (t.CohereConfig, t.CohereForCausalLM, {**d, "logit_scale": 0.5, "use_qk_norm": True},
                   "logit scaling, tied embeddings, qk-norm"),
        "cohere2": (t.Cohere2Config, t.Cohere2ForCausalLM,
                    {**d, "logit_scale": 0.5, "sliding_window": WINDOW,
                     "layer_types": ["sliding_attention", "full_attention"]},
                    "sliding window, logit scaling, no rope on full layers"),
        "starcoder2": (t.Starcoder2Config, t.Starcoder2ForCausalLM, {**d, "sliding_window": WINDOW},
                       "sliding window, layer norm, biases"),
        "qwen3-moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM,
                      {**d, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                       "output_router_logits": True, "router_aux_loss_coef": 0.01},
                      "mixture of experts, router loss, qk-norm"),
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM,
                    {**d, "num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True,
                     "router_aux_loss_coef": 0.02},
                    "mixture of experts, router loss"),
        "falcon-alibi": (t.FalconConfig, t.FalconForCausalLM,
                         {**heads, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "alibi": True,
                          "new_decoder_architecture": False, "multi_query": True, "parallel_attn": True},
                         "ALiBi, multi-query attention"),
        "bloom": (t.BloomConfig, t.BloomForCausalLM, {**heads, "hidden_size": 32, "n_layer": 2, "n_head": 4},
                  "ALiBi, embedding layer norm, tied embeddings"),
        "opt": (t.OPTConfig, t.OPTForCausalLM,
                {**heads, "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "word_embed_proj_dim": 32, "max_position_embeddings": 128, "dropout": 0.0},
                "learned positions with an offset, absolute positions from the attention mask"),
    }


FAMILIES = list(_entries())


def features(name: str) -> str:
    return _entries()[name][3]


def tiny(name: str, seed: int = 0, **overrides):
    """A tiny random model of family `name` in float32, training mode, eager weights from `seed`."""
    config_cls, model_cls, kwargs, _ = _entries()[name]
    torch.manual_seed(seed)
    config = config_cls(**{**kwargs, **overrides})
    model = model_cls(config).float()
    with torch.no_grad():  # some families start with zero biases or norms: make every parameter matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.train()


def probe_ids(seed: int = 3) -> torch.Tensor:
    """A [3, 21] batch of token ids (above the special ids) for comparing two forms of one model."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (3, 21), generator=g)


def logits_and_grads(model, ids):
    """The logits of `ids` and every parameter's gradient of a loss that weighs each logit differently, so that
    every weight's gradient is exercised."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    w = torch.linspace(-1.0, 1.0, logits.numel()).reshape(logits.shape)
    (logits.float() * w).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
