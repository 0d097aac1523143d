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
    """A judge scoring each answer after its prompt with a reward model folder (`preftune rm`'s, or any
    AutoModelForSequenceClassification with one label): the prompt and answer are tokenised as `preftune rm`
    trains on them (the chat template for message-list prompts), so the judge reads what the model learned."""
    from ..reward import load_reward_model, score_texts

    if not Path(folder, "config.json").is_file() and not Path(folder, "adapter_config.json").is_file():
        raise ConfigError(f"judge: reward-model:{folder}: not a model folder (no config.json)")
    model, tokenizer = load_reward_model(folder, device=device, flag="--judge")

    def judge(prompt, answers, system=None):
        return score_texts(model, tokenizer, [prompt] * len(answers), list(answers), batch_size=batch_size,
                           systems=[system] * len(answers))

    judge.takes_system = True  # `judged` hands it the prompt's system prompt too, as the policy was given it
    return judge


def judged(judge: Judge, prompt, answers: list[str], where: str, system: str | None = None) -> list[float]:
    """The judge's scores of `answers`, checked: one finite number per answer. `where` names the prompt in the
    one-line `JudgeError` a failing judge becomes. A judge marked `takes_system` (the reward-model judge) gets the
    prompt's `system` prompt too."""
    try:
        extra = {"system": system} if getattr(judge, "takes_system", False) else {}
        scores = judge(prompt, list(answers), **extra)
    except Exception as exc:  # the judge is user code: whatever it raises stops the run, named
        raise JudgeError(f"{where}: the judge raised {type(exc).__name__}: {exc}") from None
    try:
        if isinstance(scores, (str, bytes, dict, set, frozenset)) or not hasattr(scores, "__len__"):
            raise TypeError  # a dict's keys, a string's characters, a set or a generator would pass for scores
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        shown = " ".join(str(scores).split())[:80]  # one line, whatever the value prints as
        raise JudgeError(f"{where}: the judge returned {type(scores).__name__} {shown}, not a list of one number "
                         f"per answer") from None
    if len(scores) != len(answers):
        raise JudgeError(f"{where}: the judge returned {len(scores)} scores for {len(answers)} answers")
    if not all(math.isfinite(s) for s in scores):
        raise JudgeError(f"{where}: the judge returned a score that is not finite: {scores}")
    return scores
