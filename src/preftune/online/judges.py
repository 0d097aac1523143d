"""Judges of online training: a function `(prompt, answers) -> list[float]`, higher is better.

A judge is named by a spec string:
- `rule:NAME[:ARG]`: a built-in rule (see RULES): `longer`, `shorter` (answer length in characters),
  `contains:TEXT` (1 when the answer holds TEXT, else 0), `count:TEXT` (how often TEXT occurs);
- `python:module:function` or `python:path/to/file.py:function`: any function with the judge's signature;
- `reward-model:DIR`: a sequence-classification model folder; the score is its logit for prompt + answer.

`prompt` is the prompt as the prompts file gives it (text, or a list of {role, content} messages); `answers` are
the answer texts. `judged` checks what a judge returns and turns its failures into one `JudgeError` naming the
prompt.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError, JudgeError

Judge = Callable[[Any, list], Sequence[float]]

RULES = {
    "longer": "answer length in characters (longer is better)",
    "shorter": "minus the answer length in characters (shorter is better)",
    "contains": "contains:TEXT, 1 when the answer holds TEXT, else 0",
    "count": "count:TEXT, how many times TEXT occurs in the answer",
}


def make_judge(spec: str, *, device=None) -> Judge:
    """The judge a spec names; a wrong spec is a `ConfigError` saying the forms that work."""
    kind, _, rest = spec.partition(":")
    if kind == "rule" and rest:
        return rule_judge(rest)
    if kind == "python" and rest:
        return python_judge(rest)
    if kind == "reward-model" and rest:
        return reward_model_judge(rest, device=device)
    raise ConfigError(f"judge: {spec!r} is not a judge; use rule:NAME ({', '.join(RULES)}), "
                      f"python:module:function, python:path/file.py:function or reward-model:DIR")


def rule_judge(spec: str) -> Judge:
    name, _, arg = spec.partition(":")
    if name == "longer":
        return lambda prompt, answers: [float(len(a)) for a in answers]
    if name == "shorter":
        return lambda prompt, answers: [-float(len(a)) for a in answers]
    if name in ("contains", "count") and arg:
        if name == "contains":
            return lambda prompt, answers: [float(arg in a) for a in answers]
        return lambda prompt, answers: [float(a.count(arg)) for a in answers]
    known = "; ".join(f"{k}: {v}" for k, v in RULES.items())
    raise ConfigError(f"judge: rule:{spec} is not a built-in rule (rules: {known})")


def python_judge(spec: str) -> Judge:
    """`module:function` (importable) or `path/to/file.py:function`."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f"judge: python:{spec} needs a function name: python:module:function or "
                          "python:path/file.py:function")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"judge: python:{spec}: no file {where}")
        module_spec = importlib.util.spec_from_file_location(f"preftune_judge_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: any error it raises is theirs to see, in one line
            raise ConfigError(f"judge: python:{spec}: importing {where} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise ConfigError(f"judge: python:{spec}: cannot import {where}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"judge: python:{spec}: {where} has no function {name!r}")
    return fn


def reward_model_judge(folder: str, *, device=None, batch_size: int = 8) -> Judge:
    """A judge scoring prompt + answer with a sequence-classification model (its first logit).

    The text scored is the chat template of the prompt messages and the answer as an assistant turn when the
    tokenizer has a template and the prompt is a message list, else the prompt text followed by the answer.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not Path(folder, "config.json").is_file():
        raise ConfigError(f"judge: reward-model:{folder}: not a model folder (no config.json)")
    device = device or torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id

    def text_of(prompt, answer: str) -> str:
        if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
        if isinstance(prompt, list):
            prompt = "\n".join(m["content"] for m in prompt)
        return prompt + answer

    @torch.no_grad()
    def judge(prompt, answers):
        scores: list[float] = []
        for start in range(0, len(answers), batch_size):
            texts = [text_of(prompt, a) for a in answers[start:start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            scores.extend(model(**enc).logits[:, 0].float().tolist())
        return scores

    return judge


def judged(judge: Judge, prompt, answers: list[str], where: str) -> list[float]:
    """The judge's scores of `answers`, checked: one finite number per answer. `where` names the prompt in the
    one-line `JudgeError` a failing judge becomes."""
    try:
        scores = judge(prompt, list(answers))
    except Exception as exc:  # the judge is user code: whatever it raises stops the run, named
        raise JudgeError(f"{where}: the judge raised {type(exc).__name__}: {exc}") from None
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise JudgeError(f"{where}: the judge returned {type(scores).__name__} {str(scores)[:80]}, not a list of "
                         f"numbers") from None
    if len(scores) != len(answers):
        raise JudgeError(f"{where}: the judge returned {len(scores)} scores for {len(answers)} answers")
    if not all(math.isfinite(s) for s in scores):
        raise JudgeError(f"{where}: the judge returned a score that is not finite: {scores}")
    return scores
