"""What the demo shows: the probability of the right and the wrong answer on held-out prompts, after SFT and
after DPO, as rows, means, a printed table and `summary.json`."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data.records import PreferencePair
from ..data.tokenize import tokenize_all
from ..metrics import logps_table, preference_metrics
from ..models.load import load_model, load_tokenizer
from ..models.precision import pick_device, pick_dtype


def held_out_logps(model_dir: Path, pairs: list[dict[str, str]], *, device: str = "auto") -> torch.Tensor:
    """[N, 2] summed log-probs (nats) of chosen and rejected answers, EOS included, under the model in `model_dir`."""
    dev = pick_device(device)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), device=dev, dtype=pick_dtype("auto", dev))
    records = [PreferencePair(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    items, _ = tokenize_all(tokenizer, records, max_length=1024)  # demo sentences are ~20 tokens: nothing is cut
    return logps_table(model, items, pad_id=tokenizer.pad_token_id, device=dev, batch_size=32)


def rows(pairs: list[dict[str, str]], sft: torch.Tensor, dpo: torch.Tensor) -> list[dict]:
    """One row per held-out pair: the prompt, both answers, and each answer's whole probability exp(sum log p)."""
    out = []
    for pair, s, d in zip(pairs, sft.tolist(), dpo.tolist()):
        out.append({"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"],
                    "sft_p_chosen": math.exp(s[0]), "sft_p_rejected": math.exp(s[1]),
                    "dpo_p_chosen": math.exp(d[0]), "dpo_p_rejected": math.exp(d[1])})
    return out


def summary(table: list[dict], sft: torch.Tensor, dpo: torch.Tensor, beta: float) -> dict:
    """Means over held-out pairs; `dpo.reward_accuracy` is against the SFT model as the reference."""
    def mean(key: str) -> float:
        return sum(r[key] for r in table) / len(table)

    metrics = preference_metrics(dpo, sft, beta)
    return {
        "held_out_pairs": len(table),
        "sft": {"p_chosen": mean("sft_p_chosen"), "p_rejected": mean("sft_p_rejected")},
        "dpo": {"p_chosen": mean("dpo_p_chosen"), "p_rejected": mean("dpo_p_rejected"),
                "reward_accuracy": metrics["reward_accuracy"], "reward_margin": metrics["reward_margin"]},
        "rows": table,
    }


def pick(table: list[dict], n: int) -> list[dict]:
    """`n` rows spread evenly over the table (so both held-out templates show)."""
    if len(table) <= n:
        return table
    return [table[i * len(table) // n] for i in range(n)]


def format_table(shown: list[dict], result: dict) -> str:
    """The rows in `shown`, then the means over all held-out pairs and the reward accuracy, as aligned text."""
    def p(v: float) -> str:
        # after DPO a rejected answer can sit at 1e-10, which 0.000 would hide
        return f"{v:>14.3f}" if v >= 1e-3 else f"{v:>14.1e}"

    def probs(*values: float) -> str:
        return "".join(p(v) for v in values)

    pairs = [f"{r['chosen'].strip(' .')} / {r['rejected'].strip(' .')}" for r in shown]
    width = max(len(r["prompt"]) for r in shown) + 2
    answers = max(len(a) for a in pairs + ["right / wrong answer"])
    head = f"{'held-out prompt':<{width}}{'right / wrong answer':<{answers}}" + "".join(
        f"{h:>14}" for h in ("SFT p(right)", "p(wrong)", "DPO p(right)", "p(wrong)"))
    lines = [head, "-" * len(head)]
    for r, pair in zip(shown, pairs):
        lines.append(f"{r['prompt']:<{width}}{pair:<{answers}}" + probs(
            r["sft_p_chosen"], r["sft_p_rejected"], r["dpo_p_chosen"], r["dpo_p_rejected"]))
    s, d = result["sft"], result["dpo"]
    lines.append("-" * len(head))
    label = f"mean over all {result['held_out_pairs']} held-out pairs"
    lines.append(f"{label:<{width + answers}}" + probs(s["p_chosen"], s["p_rejected"], d["p_chosen"], d["p_rejected"]))
    lines.append(f"held-out reward accuracy of DPO against the SFT reference: {d['reward_accuracy']:.3f}")
    return "\n".join(lines)
