"""Answers of a model to prompts, sampled so that two models (policy and reference) compare side by side."""

from __future__ import annotations

import torch

from .errors import ConfigError
from .models.narrow import learned_positions, require_id_in_vocabulary


def check_positions(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse, in one line, prompts that with `max_new_tokens` more tokens would run past a learned position table
    (rotary and other computed positions extend, as in transformers), or that hold ids past the model's
    vocabulary (another tokenizer's)."""
    if not isinstance(model, torch.nn.Module):  # a stand-in with its own generate
        return
    limit = learned_positions(model)
    name = getattr(model, "name_or_path", "")
    require_id_in_vocabulary(model, max((max(ids) for ids in prompts if ids), default=-1),
                             f"model {name}" if name else "the model")
    longest = max((len(ids) for ids in prompts), default=0)
    if limit and longest + max_new_tokens > limit:
        room = f"at most {limit - longest} here" if longest < limit else "the prompt alone fills them"
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: a prompt of {longest} tokens plus {max_new_tokens} "
                          f"new ones passes the {limit} positions of this model's position table; lower it "
                          f"({room})")


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                     top_p: float, seed: int, device) -> list[str]:
    """One answer per prompt; the seed is reset per prompt so two models sample comparably."""
    check_positions(model, prompts, max_new_tokens)
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


@torch.no_grad()
def sample_groups(model, tokenizer, prompts: list[list[int]], *, samples: int, max_new_tokens: int,
                  temperature: float, top_p: float, seed: int, device, batch_size: int = 16) -> list[list[str]]:
    """`samples` answers to each prompt (a list of `samples` strings per prompt), generated in batches of
    `batch_size` prompts with the KV cache; temperature 0 decodes greedily (then `samples` should be 1).

    Prompts are padded on the left so every row continues from its last prompt token. The generator is reseeded
    per batch with `seed` + the batch's index, so the same call gives the same answers (a resumed round
    regenerates what the interrupted one did).
    """
    return sample_ended_groups(model, tokenizer, prompts, samples=samples, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, device=device,
                               batch_size=batch_size)[0]


def sample_ended_groups(model, tokenizer, prompts: list[list[int]], *, samples: int, max_new_tokens: int,
                        temperature: float, top_p: float, seed: int, device,
                        batch_size: int = 16) -> tuple[list[list[str]], list[list[bool]]]:
    """`sample_groups`, and for each answer whether it ended with the end-of-sequence token (False: cut off at
    `max_new_tokens`)."""
    check_positions(model, prompts, max_new_tokens)
    pad = tokenizer.pad_token_id
    sample = temperature > 0
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    groups: list[list[str]] = []
    ended: list[list[bool]] = []
    try:
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = prompts[start:start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            torch.manual_seed(seed + b)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=sample, temperature=temperature if sample else None,
                                 top_p=top_p if sample else None, top_k=None, num_return_sequences=samples,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            texts = [_answer_text(tokenizer, row[width:]) for row in out]
            groups.extend(texts[i * samples:(i + 1) * samples] for i in range(len(chunk)))
            stops = [tokenizer.eos_token_id in row[width:].tolist() for row in out]
            ended.extend(stops[i * samples:(i + 1) * samples] for i in range(len(chunk)))
    finally:
        model.train(was_training)
        model.config.use_cache = use_cache
    return groups, ended


def _answer_text(tokenizer, ids: torch.Tensor) -> str:
    """The answer's text: the generated tokens up to (not including) the first end-of-sequence token."""
    ids = ids.tolist()
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[:ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)
