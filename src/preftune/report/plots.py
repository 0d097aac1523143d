"""Pictures of a run, drawn from RUN/metrics.jsonl into RUN/plots/*.png.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly, never through pyplot: no global
backend to switch, no figure registry to leak, safe inside a training process and without a display.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .tracking import EVAL_PREFIX, read_metrics

PLOTS_DIR = "plots"
STEP_LABEL = "optimizer step"
CHOSEN, REJECTED, MARGIN, EVAL = "#2a9d5c", "#d1495b", "#3d5a98", "#e08e0b"
_STYLE = {
    "font.size": 11, "axes.titlesize": 13, "axes.labelsize": 11, "legend.fontsize": 10,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
}


def write_plots(run_dir: Path) -> list[Path]:
    """Render every figure the run's metrics allow; return the PNG paths written.

    A DPO run gets loss, reward accuracy, rewards (chosen, rejected and the margin between them) and answer
    log-probs; eval rows are drawn on the matching figure and, when there are more than a loss, on eval.png.
    A KTO run gets loss and kto.png (rewards of desirable and undesirable answers, and the KL estimate).
    An SFT run, which logs no rewards, gets the loss figure only. Raises PreftuneError on a missing or empty
    metrics file.
    """
    rows = read_metrics(Path(run_dir))
    train = [row for row in rows if not any(key.startswith(EVAL_PREFIX) for key in row)]
    evals = [row for row in rows if row not in train]
    out = Path(run_dir) / PLOTS_DIR
    written = []
    with _style():
        for name, draw in _FIGURES:
            fig = draw(train, evals)
            if fig is not None:
                written.append(_save(fig, out / f"{name}.png"))
    return written


# ---------------------------------------------------------------------- run figures
def _loss(train: list[dict], evals: list[dict]) -> Figure | None:
    if not _has(train, "loss") and not _has(evals, "eval_loss"):
        return None
    fig, ax = _figure("Loss")
    _noisy(ax, train, "loss", "train", MARGIN)
    _points(ax, evals, "eval_loss", "eval", EVAL)
    _labels(ax, "loss (nats)")
    return fig


def _accuracy(train: list[dict], evals: list[dict]) -> Figure | None:
    if not _has(train, "reward_accuracy"):
        return None
    fig, ax = _figure("Reward accuracy: pairs where the chosen answer out-scores the rejected one")
    _noisy(ax, train, "reward_accuracy", "train", MARGIN, scale=100)
    _points(ax, evals, "eval_reward_accuracy", "eval", EVAL, scale=100)
    ax.axhline(50, color="grey", linestyle=":", linewidth=1, label="chance (50%)")
    ax.set_ylim(-2, 102)
    _labels(ax, "reward accuracy (%)")
    return fig


def _rewards(train: list[dict], evals: list[dict]) -> Figure | None:
    if not (_has(train, "chosen_reward") and _has(train, "rejected_reward")):
        return None
    fig = _new_figure(height=6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    top.set_title("Implicit rewards β·log(π/π_ref)")
    both = [row for row in train if _number(row.get("chosen_reward")) and _number(row.get("rejected_reward"))]
    steps, chosen = _smoothed(*_series(both, "chosen_reward"))
    _, rejected = _smoothed(*_series(both, "rejected_reward"))
    _noisy(top, train, "chosen_reward", "chosen", CHOSEN)
    _noisy(top, train, "rejected_reward", "rejected", REJECTED)
    top.fill_between(steps, rejected, chosen, color=MARGIN, alpha=0.12, linewidth=0, label="margin")
    top.axhline(0, color="grey", linewidth=0.8)
    _labels(top, "reward (nats)", xlabel=None)
    # The margin is its own panel: late in a run it is small beside the rewards and hard to read off the gap.
    margins = train if _has(train, "reward_margin") else [
        {"step": row["step"], "reward_margin": row["chosen_reward"] - row["rejected_reward"]} for row in both]
    _noisy(bottom, margins, "reward_margin", "train", MARGIN)
    _points(bottom, evals, "eval_reward_margin", "eval", EVAL)
    bottom.set_title("Reward margin: chosen − rejected", fontsize=11)
    bottom.axhline(0, color="grey", linewidth=0.8)
    _labels(bottom, "margin (nats)")
    return fig


def _logps(train: list[dict], evals: list[dict]) -> Figure | None:
    if not (_has(train, "chosen_logp") and _has(train, "rejected_logp")):
        return None
    fig, ax = _figure("Policy log-probability of the answers")
    _noisy(ax, train, "chosen_logp", "chosen", CHOSEN)
    _noisy(ax, train, "rejected_logp", "rejected", REJECTED)
    _points(ax, evals, "eval_chosen_logp", "eval chosen", CHOSEN, marker="s")
    _points(ax, evals, "eval_rejected_logp", "eval rejected", REJECTED, marker="s")
    _labels(ax, "log-prob (nats, summed over answer tokens)")
    return fig


def _kto(train: list[dict], evals: list[dict]) -> Figure | None:
    """KTO: rewards of desirable and undesirable answers, and the KL estimate they are measured against."""
    if not (_has(train, "desirable_reward") or _has(train, "undesirable_reward")):
        return None
    fig = _new_figure(height=6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    top.set_title("KTO rewards β·log(π/π_ref)")
    _noisy(top, train, "desirable_reward", "desirable", CHOSEN)
    _noisy(top, train, "undesirable_reward", "undesirable", REJECTED)
    _points(top, evals, "eval_desirable_reward", "eval desirable", CHOSEN, marker="s")
    _points(top, evals, "eval_undesirable_reward", "eval undesirable", REJECTED, marker="s")
    top.axhline(0, color="grey", linewidth=0.8)
    _labels(top, "reward (nats)", xlabel=None)
    _noisy(bottom, train, "kl", "train", MARGIN)
    _points(bottom, evals, "eval_kl", "eval", EVAL)
    bottom.set_title("KL estimate (mismatched prompt/answer pairs, clamped at 0)", fontsize=11)
    _labels(bottom, "KL (nats)")
    return fig


# The eval panels, in reading order: (title, y label, keys). Chosen/rejected pairs share a panel. Other eval keys
# (pair counts, the reference's fixed log-probs) are bookkeeping, not curves, and are left out.
_EVAL_PANELS = (
    ("loss", "loss (nats)", ("eval_loss",)),
    ("reward accuracy", "accuracy (%)", ("eval_reward_accuracy",)),
    ("reward margin", "margin (nats)", ("eval_reward_margin",)),
    ("rewards β·log(π/π_ref)", "reward (nats)", ("eval_chosen_reward", "eval_rejected_reward")),
    ("answer log-probs", "log-prob (nats)", ("eval_chosen_logp", "eval_rejected_logp")),
    ("log-ratio to the reference", "log(π/π_ref) (nats)", ("eval_logratio_chosen", "eval_logratio_rejected")),
)


def _eval_grid(train: list[dict], evals: list[dict]) -> Figure | None:
    panels = [panel for panel in _EVAL_PANELS if any(_has(evals, key) for key in panel[2])]
    if len(panels) < 2:  # a lone eval loss is already on the loss figure
        return None
    if len({row["step"] for row in evals}) < 2:  # one point a panel shows no trend; the numbers are in the card
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _new_figure(width=4.4 * cols, height=3.3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    fig.suptitle("Evaluation on held-out pairs", fontsize=14)
    for ax, (title, ylabel, keys) in zip(axes, panels):
        scale = 100 if "accuracy" in keys[0] else 1
        for key in keys:
            color = CHOSEN if "chosen" in key else REJECTED if "rejected" in key else EVAL
            label = "chosen" if color == CHOSEN else "rejected" if color == REJECTED else None
            _points(ax, evals, key, label, color, scale=scale)
        if scale == 100:
            ax.set_ylim(-2, 102)
        ax.set_title(title, fontsize=11)
        _labels(ax, ylabel)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


_FIGURES = (("loss", _loss), ("reward_accuracy", _accuracy), ("rewards", _rewards), ("logps", _logps),
            ("kto", _kto), ("eval", _eval_grid))
PLOT_NAMES = tuple(name for name, _ in _FIGURES)


# ---------------------------------------------------------------------- demo figure
# (row key, legend label, colour, opacity): after SFT pale and hatched, after DPO solid.
_DEMO_BARS = (("sft_p_chosen", "SFT · chosen", CHOSEN, 0.45), ("sft_p_rejected", "SFT · rejected", REJECTED, 0.45),
              ("dpo_p_chosen", "DPO · chosen", CHOSEN, 1.0), ("dpo_p_rejected", "DPO · rejected", REJECTED, 1.0))

def plot_demo_probabilities(rows: list[dict], path: Path) -> Path:
    """Grouped bars: for each held-out prompt, P(chosen) and P(rejected) after SFT and after DPO.

    `rows`: [{"prompt": str, "sft_p_chosen": float, "sft_p_rejected": float, "dpo_p_chosen": float,
    "dpo_p_rejected": float}, ...]. Probabilities spanning several orders of magnitude get a log axis.
    """
    with _style():
        fig = _new_figure(width=max(8.0, 1.7 * len(rows) + 2.5), height=5.2)
        _demo_bars(fig.subplots(), rows)
        return _save(fig, Path(path))


def _demo_bars(ax: Axes, rows: list[dict]) -> None:
    width = 0.2
    for i, (key, label, color, alpha) in enumerate(_DEMO_BARS):
        xs = [n + (i - 1.5) * width for n in range(len(rows))]
        hatch = "//" if key.startswith("sft") else None
        ax.bar(xs, [float(row[key]) for row in rows], width, label=label, color=color, alpha=alpha,
               hatch=hatch, edgecolor=color, linewidth=0.8)
    values = [float(row[key]) for row in rows for key, *_ in _DEMO_BARS]
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 1e3:
        ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [_short(str(row["prompt"])) for row in rows], fontsize=9)
    ax.grid(axis="x", visible=False)
    ax.set_title("Probability of each answer, after SFT and after DPO")
    ax.set_xlim(-0.6, len(rows) - 0.4)  # keeps a lone prompt's bars as narrow as in a chart of many
    ax.set_ylabel("probability of the answer")
    ax.set_xlabel("held-out prompt")
    # Below the axes, not inside: the tallest bars are exactly where an inside legend would land.
    ax.figure.legend(loc="outside lower center", ncols=4, frameon=False)


def _short(prompt: str, width: int = 18, lines: int = 3) -> str:
    """A tick label: the prompt on one line, wrapped to `lines` lines of `width`, cut with an ellipsis."""
    flat = " ".join(prompt.split())
    return "\n".join(textwrap.wrap(flat, width, max_lines=lines, placeholder="…")) or "(empty)"


# ---------------------------------------------------------------------- online rounds
def plot_online_rounds(rows: list[dict], path: Path) -> Path:
    """Judged scores of an online run's policy after each round: the mean score of the samples the next round
    drew from it (with their spread) and the mean score of its greedy answers to held-out prompts. `rows`: the
    run's metrics rows, one per round ({"round", "score_mean", "score_std", "eval_score"}, each but "round"
    optional)."""
    with _style():
        fig, ax = _figure("Online DPO: judged score by round")
        sampled = [r for r in rows if "score_mean" in r]
        if sampled:
            xs = [r["round"] - 1 for r in sampled]  # round r samples the policy of r - 1 rounds
            mean = [float(r["score_mean"]) for r in sampled]
            std = [float(r["score_std"]) for r in sampled]
            ax.plot(xs, mean, color=MARGIN, marker="o", linewidth=1.5, label="samples (mean ± sd)")
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=MARGIN, alpha=0.15)
        held = [r for r in rows if "eval_score" in r]
        if held:
            ax.plot([r["round"] for r in held], [float(r["eval_score"]) for r in held], color=EVAL, marker="s",
                    linewidth=1.5, label="held-out prompts, greedy")
        _labels(ax, "judge score", "rounds of training done")
        return _save(fig, Path(path))


# ---------------------------------------------------------------------- drawing helpers
def _style():
    """Our fonts and grid for the figures drawn inside, leaving the caller's matplotlib settings alone."""
    import matplotlib

    return matplotlib.rc_context(_STYLE)


def _new_figure(width: float = 8.0, height: float = 4.6) -> Figure:
    # Constrained layout sizes the margins to the labels, so long titles and tick labels are never clipped.
    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _figure(title: str) -> tuple[Figure, Axes]:
    fig = _new_figure()
    ax = fig.subplots()
    ax.set_title(title)
    return fig, ax


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(rows: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """Steps and values of `key`; inf becomes NaN so a diverged step is a gap, not a broken axis."""
    steps, values = [], []
    for row in rows:
        if _number(row.get(key)):  # a hand-edited file may hold other values: they are gaps, as missing ones are
            value = float(row[key]) * scale
            steps.append(int(row["step"]))
            values.append(value if math.isfinite(value) else math.nan)
    return steps, values


def _smoothed(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    """Centred moving average over about 1/25 of the run, NaN-aware, window shrinking at the ends.

    Centred rather than exponential: the whole run is at hand, and a trailing average draws every trend late.
    """
    if len(values) < 10:
        return steps, values
    import numpy as np

    half = max(1, len(values) // 50)
    raw = np.asarray(values, dtype=float)
    known = np.isfinite(raw)
    kernel = np.ones(2 * half + 1)
    sums = np.convolve(np.where(known, raw, 0.0), kernel, mode="same")
    counts = np.convolve(known.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return steps, list(np.where(counts > 0, sums / counts, np.nan))


def _noisy(ax: Axes, rows: list[dict], key: str, label: str, color: str, scale: float = 1.0) -> None:
    """A per-step series: the raw values faint, their moving average solid."""
    steps, values = _series(rows, key, scale)
    if not steps:
        return
    _, smooth = _smoothed(steps, values)
    if smooth is not values:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.9)
    # A run of a few steps gets markers, or a single step would draw nothing at all.
    marker = "o" if len(steps) < 10 else None
    ax.plot(steps, smooth, color=color, linewidth=2, label=label, marker=marker, markersize=4)


def _points(ax: Axes, rows: list[dict], key: str, label: str | None, color: str, *, scale: float = 1.0,
            marker: str = "o") -> None:
    """An eval series: few points, each one a measurement worth marking."""
    steps, values = _series(rows, key, scale)
    if steps:
        ax.plot(steps, values, color=color, marker=marker, markersize=5, linewidth=1.5, label=label)


def _labels(ax: Axes, ylabel: str, xlabel: str | None = STEP_LABEL) -> None:
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    handles, _ = ax.get_legend_handles_labels()
    if len(handles) > 1:
        ax.legend(frameon=False)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _has(rows: Sequence[dict], key: str) -> bool:
    return any(key in row for row in rows)
