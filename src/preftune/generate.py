"""Answers of a model to prompts, sampled so that two models (policy and reference) compare side by side."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                     top_p: float, seed: int, device) -> list[str]:
    """One answer per prompt; the seed is reset per prompt so two models sample comparably."""
    answers = []
    for ids in prompts:
        torch.manual_seed(seed)
        x = torch.tensor([ids], device=device)
        sample = temperature > 0
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=sample, temperature=temperature if sample else None,
                             top_p=top_p if sample else None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    return answers
