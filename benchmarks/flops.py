"""Useful floating-point work of one DPO step, counted from real token counts: what the utilization figures divide.

For a decoder with `N` matmul weights in its layers (attention and MLP projections; the embedding lookup is no
matmul) and an output projection of `V x H` weights:

- a token through the layers costs 2N FLOPs forward, 4N backward (6N for a trained pass, 2N for the reference);
- a token projected to the vocabulary costs 2VH forward (6VH trained);
- attention costs, per layer and per token at position t, 2 * d * (t + 1) for the scores and as much for the
  weighted values (d = heads x head_dim); forward 4 L d (t + 1), trained 12 L d (t + 1).

preftune computes each prompt once and both answers from its cache, and projects only the answer positions.
TRL computes each answer row as prompt + answer and projects every position. Padding is never counted: only real
tokens are useful work.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    layer_params: int  # matmul weights in the decoder layers
    head_params: int   # vocab x hidden
    layers: int
    attn_dim: int      # heads x head_dim

    @classmethod
    def of(cls, cfg: dict) -> "Shape":
        h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or h // heads
        kv = cfg.get("num_key_value_heads") or heads
        q, kv_dim = heads * head_dim, kv * head_dim
        per_layer = h * q * 2 + h * kv_dim * 2 + 3 * h * cfg["intermediate_size"]  # q, o, k, v; gate, up, down
        return cls(layers * per_layer, cfg["vocab_size"] * h, layers, q)


def _positions(start: int, stop: int) -> int:
    """Sum of (t + 1) for t in [start, stop): keys attended to by the tokens at those positions."""
    return (stop * (stop + 1) - start * (start + 1)) // 2


def pair_flops(shape: Shape, prompt: int, chosen: int, rejected: int, *, tool: str, reference: bool = True) -> float:
    """Useful FLOPs of one pair in one step: policy forward+backward, and the reference forward unless its
    log-probs come from a cache (`reference=False`)."""
    if tool == "preftune":
        tokens = prompt + chosen + rejected
        projected = chosen + rejected
        keys = _positions(0, prompt) + _positions(prompt, prompt + chosen) + _positions(prompt, prompt + rejected)
    elif tool == "trl":
        tokens = 2 * prompt + chosen + rejected
        projected = tokens
        keys = _positions(0, prompt + chosen) + _positions(0, prompt + rejected)
    else:
        raise ValueError(tool)
    per_pass = 2 * shape.layer_params * tokens + 2 * shape.head_params * projected + 4 * shape.layers * shape.attn_dim * keys
    return (4 if reference else 3) * per_pass  # trained policy (3 passes' worth) + frozen reference (1)


def mean_pair_flops(shape: Shape, lengths: list[tuple[int, int, int]], *, tool: str, reference: bool = True) -> float:
    return sum(pair_flops(shape, p, c, r, tool=tool, reference=reference) for p, c, r in lengths) / len(lengths)


def matmul_rate(dtype_name: str = "float32", size: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """FLOP/s of a large square matmul on this machine, median of `repeats` after one warm-up."""
    import statistics
    import time

    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return 2 * size ** 3 / statistics.median(times)
