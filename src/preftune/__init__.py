"""preftune: fine-tune causal language models on human preferences (SFT, then DPO).

The Python API (the `preftune` command is a thin layer over it):

    result = preftune.train("dpo", model=model, tokenizer=tokenizer, data=records, beta=0.1, max_steps=100)
    report = preftune.evaluate(model=result.model, ref_model=..., tokenizer=tokenizer, data=held_out)
    pairs = preftune.load_pairs("pairs.jsonl")
    scores = preftune.score("runs/rm", "pairs.jsonl")       # a reward model's rewards (preftune.train("rm", ...))

The training loop itself lives in `preftune.training`, the preference metrics in `preftune.metrics`.
"""

from .api import EvalReport, TrainResult, evaluate, load_pairs, score, train, train_from_config  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .errors import ConfigError, DataError, ModelError, NonFiniteError, PreftuneError  # noqa: E402
from .losses import preference_loss  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "train", "evaluate", "score", "load_pairs", "train_from_config", "TrainResult", "EvalReport", "TrainConfig",
    "preference_loss", "PreftuneError", "ConfigError", "DataError", "ModelError", "NonFiniteError",
    "__version__",
]
