"""preftune: fine-tune causal language models on human preferences (SFT, then DPO).

The Python API (the `preftune` command is a thin layer over it):

    result = preftune.train("dpo", model=model, tokenizer=tokenizer, data=records, beta=0.1, max_steps=100)
    report = preftune.evaluate(model=result.model, ref_model=..., tokenizer=tokenizer, data=held_out)
    pairs = preftune.load_pairs("pairs.jsonl")

`preftune.train` and `preftune.evaluate` are also the modules that hold the training loop and the preference
metrics (`from preftune.train import run`); calling them calls the API functions of the same name.
"""

import sys as _sys
import types as _types

__version__ = "0.1.0"

from . import evaluate as _evaluate_module  # noqa: E402
from . import train as _train_module  # noqa: E402
from .api import EvalReport, TrainResult  # noqa: E402
from .api import evaluate as _evaluate  # noqa: E402
from .api import load_pairs  # noqa: E402
from .api import train as _train  # noqa: E402
from .api import train_from_config  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .errors import ConfigError, DataError, ModelError, NonFiniteError, PreftuneError  # noqa: E402
from .losses import preference_loss  # noqa: E402


class _CallableModule(_types.ModuleType):
    """A module that, called, calls its API function: `preftune.train(...)` while `preftune.train` stays the
    module other code imports from. `inspect.signature(preftune.train)` gives the function's; its docstring is
    `preftune.api.train.__doc__`."""

    def __call__(self, *args, **kwargs):
        return self.__wrapped__(*args, **kwargs)


def _make_callable(module: _types.ModuleType, function) -> None:
    module.__class__ = _CallableModule
    module.__wrapped__ = function


_make_callable(_sys.modules[__name__ + ".train"], _train)
_make_callable(_sys.modules[__name__ + ".evaluate"], _evaluate)
train = _sys.modules[__name__ + ".train"]
evaluate = _sys.modules[__name__ + ".evaluate"]

__all__ = [
    "train", "evaluate", "load_pairs", "train_from_config", "TrainResult", "EvalReport", "TrainConfig",
    "preference_loss", "PreftuneError", "ConfigError", "DataError", "ModelError", "NonFiniteError",
    "__version__",
]
