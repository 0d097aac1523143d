"""Synthetic run folders: a metrics.jsonl shaped like the trainer's, without training anything."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from preftune.io import write_jsonl


def metric_rows(stage: str, steps: int = 60, eval_every: int = 0) -> list[dict]:
    """Noisy curves that move the way a healthy run's do; eval rows every `eval_every` steps (0: none)."""
    rnd = random.Random(0)
    rows = []
    for step in range(1, steps + 1):
        f = step / steps
        row = {"step": step, "loss": 0.69 * math.exp(-2 * f) + rnd.gauss(0, 0.03), "lr": 1e-6, "grad_norm": 1.0}
        if stage == "dpo":
            chosen, rejected = 0.5 * f + rnd.gauss(0, 0.05), -0.8 * f + rnd.gauss(0, 0.05)
            row.update(reward_accuracy=min(1.0, 0.5 + 0.4 * f), chosen_reward=chosen, rejected_reward=rejected,
                       reward_margin=chosen - rejected, chosen_logp=-80 + 5 * f, rejected_logp=-85 - 9 * f,
                       pairs_per_s=12.5)
        else:
            row["samples_per_s"] = 40.0
        rows.append(row)
        if eval_every and step % eval_every == 0:
            evals = {"step": step, "eval_loss": 0.69 * math.exp(-1.5 * f)}
            if stage == "dpo":
                evals.update(eval_reward_accuracy=0.5 + 0.3 * f, eval_reward_margin=1.2 * f,
                             eval_chosen_logp=-81 + 4 * f, eval_rejected_logp=-86 - 8 * f, eval_logratio_chosen=0.4 * f)
            rows.append(evals)
    return rows


@pytest.fixture
def make_run(tmp_path: Path):
    def make(stage: str = "dpo", *, steps: int = 60, eval_every: int = 0, name: str = "run") -> Path:
        run = tmp_path / name
        write_jsonl(run / "metrics.jsonl", metric_rows(stage, steps, eval_every))
        return run

    return make
