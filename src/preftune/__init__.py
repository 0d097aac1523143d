"""preftune: fine-tune causal language models on human preferences (SFT, then DPO).

The Python API (the `preftune` command is a thin layer over it):

    result = preftune.train("dpo", model=model, tokenizer=tokenizer, data=records, beta=0.1, max_steps=100)
    report = preftune.evaluate(model=result.model, ref_model=..., tokenizer=tokenizer, data=held_out)
    pairs = preftune.load_pairs("pairs.jsonl")
    scores = preftune.score("runs/rm", "pairs.jsonl")       # a reward model's rewards (preftune.train("rm", ...))

The training loop itself lives in `preftune.training`, the preference metrics in `preftune.metrics`.
"""

import importlib
import importlib.util

from .config import TrainConfig  # noqa: E402
from .errors import ConfigError, DataError, ModelError, NonFiniteError, PreftuneError  # noqa: E402
from .version import __version__  # noqa: E402

# Loaded on first use: they bring torch and transformers, which the command line imports only for a command that
# needs them (`preftune --help` answers at once, and Ctrl-C while starting is the CLI's one line).
_LAZY = {"train": "api", "evaluate": "api", "score": "api", "load_pairs": "api", "train_from_config": "api",
         "TrainResult": "api", "EvalReport": "api", "preference_loss": "losses"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # preftune.reward, preftune.training, ...
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "train", "evaluate", "score", "load_pairs", "train_from_config", "TrainResult", "EvalReport", "TrainConfig",
    "preference_loss", "PreftuneError", "ConfigError", "DataError", "ModelError", "NonFiniteError",
    "__version__",
]
