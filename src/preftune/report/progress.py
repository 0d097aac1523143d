"""What a person watching a run sees: a live bar on a terminal, plain periodic lines in a log file.

The line is the same in both: step/total, loss, reward accuracy and margin (DPO), KL (KTO), throughput and time
left.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

# Every choice of which metrics a person reads is here. The live line: (row key, how it reads), in this order
# when present in a row.
_FIELDS = (
    ("loss", "loss {:.4f}"),
    ("reward_accuracy", "acc {:.1%}"),
    ("reward_margin", "margin {:.3f}"),
    ("kl", "kl {:.3f}"),  # KTO's KL estimate
    ("pairs_per_s", "{:.1f} pairs/s"),
    ("samples_per_s", "{:.1f} samples/s"),
)


# The line printed after each evaluation, and the one a finished run ends with.
EVAL_KEYS = ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_logratio_chosen")


def describe_eval(row: dict) -> str:
    """`eval @ step 40: loss=0.6012  reward_accuracy=0.7500 ...` from an evaluation row (keys `eval_*`)."""
    return "eval @ step {}: ".format(row["step"]) + "  ".join(f"{k[5:]}={row[k]:.4f}" for k in EVAL_KEYS if k in row)


def describe_final(output_dir, final: dict) -> str:
    """`done: RUN  eval_loss=0.6123  ...`: the run folder and its headline (report/card.py's `headline_text`):
    eval metrics when there was eval data, else training metrics averaged over the last steps."""
    from .card import headline_text

    return f"done: {output_dir}  {headline_text(final)}"


class Progress:
    """Reports training progress; use as `with Progress(total, quiet=..., stage="dpo") as bar: bar.update(step, row)`.

    `stage` names the run in the output. `log_every` spaces the plain lines (the last step is always printed);
    the live bar redraws at every step. `quiet` prints nothing at all.
    """

    def __init__(self, total_steps: int, *, quiet: bool, stage: str, log_every: int = 1) -> None:
        self.total = total_steps
        self.quiet = quiet
        self.stage = stage
        self.log_every = max(1, log_every)
        self._out: TextIO = sys.stdout  # read now, not at import, so a redirected stdout is honoured
        self._bar: Any = None
        self._task: Any = None
        self._opened = time.monotonic()
        self._first: tuple[int, float] | None = None  # (step, time) of the first update, for the rate

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Progress":
        self._opened = time.monotonic()
        if not self.quiet and _is_terminal(self._out):
            self._bar = _rich_bar(self._out)
            self._task = self._bar.add_task(self.stage, total=self.total, metrics="")
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    # ------------------------------------------------------------------ reporting
    def update(self, step: int, row: dict) -> None:
        """Call after optimizer step `step` (1-based) with that step's metrics row."""
        if self.quiet:
            return
        now = time.monotonic()
        if self._first is None:
            self._first = (step, now)
        text = self.describe(step, row, now)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, metrics=text)
        elif step % self.log_every == 0 or step >= self.total:
            print(f"{self.stage} step {step}/{self.total} | {text}", file=self._out, flush=True)

    def print(self, msg: str) -> None:
        """A message (eval results, checkpoint saved) printed above the bar rather than through it."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(msg, highlight=False, markup=False)
        else:
            print(msg, file=self._out, flush=True)

    def describe(self, step: int, row: dict, now: float) -> str:
        """`loss 0.6931 | acc 62.5% | margin 0.120 | 14.2 pairs/s | 1:05 left`: the fields `row` holds."""
        parts = [fmt.format(float(row[key])) for key, fmt in _FIELDS if key in row]
        left = self._seconds_left(step, now)
        parts.append(f"{_clock(left)} left" if left is not None else "-- left")
        return " | ".join(parts)

    def _seconds_left(self, step: int, now: float) -> float | None:
        # The rate counts from this process's first step, not step 0, so a resumed run's estimate is right;
        # and from that step's end, not from opening, so set-up time (loading, reference pass) is left out.
        # Until a second step the first one's duration, measured from opening, is all there is.
        first, since = self._first if self._first and step > self._first[0] else (step - 1, self._opened)
        done, elapsed = step - first, now - since
        if done <= 0 or elapsed <= 0:
            return None
        return max(0, self.total - step) * elapsed / done


def _clock(seconds: float) -> str:
    """3725 -> "1:02:05"; 65 -> "1:05"."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _rich_bar(stream: TextIO) -> Any:
    # Imported here: rich costs ~100 ms at import and a non-terminal run never draws a bar.
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
    from rich.table import Column

    console = Console(file=stream, force_terminal=True)
    return RichProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        # The one column allowed to wrap: on a narrow terminal the metrics take two lines, the step count stays whole.
        TextColumn("{task.fields[metrics]}", markup=False, table_column=Column(no_wrap=False)),
        console=console,
        auto_refresh=True,
        redirect_stdout=False,
        redirect_stderr=False,
    )
