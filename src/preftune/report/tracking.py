"""The metrics file of a run (RUN/metrics.jsonl), and the optional sinks it is copied to.

One JSON object a line, each with an integer "step". Training rows hold plain metric names (loss, lr,
reward_accuracy, ...); evaluation rows hold names prefixed "eval_". The file is the record of truth: plots and
the model card are drawn from it, so TensorBoard and Weights & Biases are extras that a run never needs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import ConfigError, PreftuneError
from ..io import append_jsonl

METRICS_FILE = "metrics.jsonl"
EVAL_PREFIX = "eval_"


class Tracker:
    """Appends metric rows to RUN/metrics.jsonl and forwards them to the sinks named in `config.report_to`.

    Only the main process writes: under torchrun every rank may call `log`, and ranks other than 0 are no-ops.
    Reopening a run folder (resume) appends to the same file; readers keep the last row logged for a step.
    """

    def __init__(self, run_dir: Path, config: TrainConfig, *, is_main: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.is_main = is_main
        self._sinks: list[Any] = []
        if not is_main:
            return
        names = parse_sinks(config.report_to)  # fail on a typo before creating anything
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            for name in names:
                self._sinks.append(_SINKS[name](Path(run_dir), config))
        except BaseException:
            self.close()
            raise

    def log(self, row: dict) -> None:
        """Record one row. `row["step"]` is the optimizer step; other values are numbers (tensors are unwrapped)."""
        if not self.is_main:
            return
        if "step" not in row:
            raise ValueError(f"a metrics row needs a 'step', got keys {sorted(row)}")
        clean = {key: _plain(value) for key, value in row.items()}
        append_jsonl(self.path, clean)
        scalars = {key: float(value) for key, value in clean.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        for sink in self._sinks:
            sink.log(scalars, int(clean["step"]))

    def close(self) -> None:
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_sinks(report_to: str) -> list[str]:
    """`"tensorboard, wandb"` -> `["tensorboard", "wandb"]`; empty and "none" mean no sinks."""
    names = [part.strip().lower() for part in report_to.split(",") if part.strip()]
    names = [name for name in names if name != "none"]
    for name in names:
        if name not in _SINKS:
            raise ConfigError(f"report_to: unknown sink {name!r}; choose from {', '.join(_SINKS)} (comma-separated)")
    return list(dict.fromkeys(names))


def check_sinks(report_to: str) -> None:
    """Fail now, before a run writes anything, if a sink in `report_to` is unknown or its package is missing."""
    import importlib.util

    for name in parse_sinks(report_to):
        module, extra = _SINK_PACKAGES[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"report_to: {name} is not installed; pip install preftune[{extra}], or drop it from "
                              f"--report-to")


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl, training and eval split apart, sorted by step, one of each kind per step.

    A resumed run logs again the steps after its last checkpoint; the later row is the one that counts. A last
    line cut short by a kill is skipped. A row that mixes both kinds is split in two.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise PreftuneError(f"{path}: no metrics file; is {run_dir} a preftune run folder?")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PreftuneError(f"{path}: not UTF-8 text, so not a metrics file preftune wrote") from None
    latest: dict[tuple[bool, int], dict] = {}
    cut = None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError, OverflowError):
            if number == len(lines):
                cut = number
                continue  # a write interrupted by a kill
            raise PreftuneError(f"{path} line {number}: not a metrics row with a 'step'") from None
        for is_eval in (False, True):
            part = {k: v for k, v in row.items() if k != "step" and k.startswith(EVAL_PREFIX) == is_eval}
            if part:
                latest[(is_eval, step)] = {"step": step, **part}
    if not latest and cut is not None:
        raise PreftuneError(f"{path}: holds no metrics row (line {cut}, its last, is not one)")
    if not latest:
        raise PreftuneError(f"{path}: empty; the run logged no metrics yet")
    return [latest[key] for key in sorted(latest, key=lambda key: (key[1], key[0]))]


def recent_means(rows: list[dict], steps: int = 10) -> dict[str, float]:
    """Training metrics of `rows` (metrics.jsonl's) averaged over the last `steps` logged steps, as `mean_<name>`
    plus `mean_over_steps`: a run's summary that one lucky or unlucky last batch does not decide. Non-finite values
    are left out."""
    train = [row for row in rows if not any(k.startswith(EVAL_PREFIX) for k in row)][-steps:]
    out: dict[str, float] = {}
    for key in ("loss", "reward_accuracy", "reward_margin"):
        values = [row[key] for row in train if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
        if values:
            out[f"mean_{key}"] = sum(values) / len(values)
    if out:
        out["mean_over_steps"] = len(train)
    return out


def _plain(value: Any) -> Any:
    """JSON-ready: a 0-d tensor or numpy scalar becomes a Python number.

    NaN and inf are kept (json writes NaN/Infinity and reads them back): a diverged step stays visible.
    """
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


# ---------------------------------------------------------------------- optional sinks
class _TensorBoard:
    def __init__(self, run_dir: Path, config: TrainConfig) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("report_to: tensorboard is not installed; pip install preftune[tensorboard]") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        # "eval_loss" -> "eval/loss", "loss" -> "train/loss": TensorBoard groups charts by the part before "/".
        for key, value in scalars.items():
            tag = "eval/" + key[len(EVAL_PREFIX):] if key.startswith(EVAL_PREFIX) else "train/" + key
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: TrainConfig) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("report_to: wandb is not installed; pip install preftune[wandb]") from None
        # Offline unless the user chose otherwise: a training run must not upload anything nobody asked for.
        mode = None if os.environ.get("WANDB_MODE") else "offline"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "preftune"), name=Path(run_dir).name,
                              dir=str(run_dir), config=config.to_dict(), mode=mode)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


_SINKS = {"tensorboard": _TensorBoard, "wandb": _WandB}
# The module each sink imports, and the extra that installs it.
_SINK_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
