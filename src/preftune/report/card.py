"""RUN/README.md: a Hugging Face model card, so a run folder pushed to the Hub explains itself."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Sequence

import yaml

from ..config import TrainConfig
from ..io import atomic_write_text
from ..models.load import looks_like_hub_id
from ..version import __version__
from .plots import PLOT_NAMES, PLOTS_DIR


# The eval numbers that describe a run, in the order shown; training means are the fallback.
HEADLINE_EVAL = ("eval_loss", "eval_reward_accuracy", "eval_reward_margin")
RECENT_PREFIX = "mean_"  # training metrics averaged over the last steps (tracking.recent_means)


def headline(final_metrics: dict) -> dict[str, float]:
    """The numbers that describe a finished run: its eval metrics when it had eval data, else its training
    metrics averaged over the last steps. Never the last batch alone: on 4 pairs its reward accuracy is 0, 0.25,
    ... or 1.0 by chance."""
    evals = {k: final_metrics[k] for k in HEADLINE_EVAL if k in final_metrics}
    if evals:
        return evals
    return {k: v for k, v in final_metrics.items() if k.startswith(RECENT_PREFIX) and k != "mean_over_steps"}


def headline_text(final_metrics: dict) -> str:
    """`headline` as one line: `eval_loss=0.6123  eval_reward_accuracy=0.5900`."""
    shown = "  ".join(f"{k}={v:.4f}" for k, v in headline(final_metrics).items())
    steps = final_metrics.get("mean_over_steps")
    if shown and steps and not any(k.startswith("eval_") for k in headline(final_metrics)):
        shown += f"  (training, mean of the last {steps} steps)"
    return shown


def write_model_card(run_dir: Path, config: TrainConfig, final_metrics: dict, command: str | Sequence[str],
                     data_stats: dict | None = None, adapters: bool = False) -> Path:
    """Write RUN/README.md: metadata block, what was trained, data counts, headline and final metrics, config,
    plots, the command.

    `command` is the command line that reproduces the run: a string as typed, or an argv list that is
    shell-quoted here. `data_stats` is what run_dir writes to data_stats.json. `adapters`: the run trained LoRA
    adapters (saved as the folder's adapter_config.json). Plots are linked only if they exist, so write the plots
    first.
    """
    run_dir = Path(run_dir)
    adapter = _adapter(run_dir) if adapters else None
    sections = [
        _front_matter(config, adapter),
        f"# {run_dir.resolve().name}\n\n{_summary(config, adapter)}",
        *(["## Data\n\n" + _data_counts(data_stats)] if data_stats else []),
        "## Results\n\n" + _results(final_metrics),
        "## Training config\n\n```yaml\n" + yaml.safe_dump(config.to_dict(), sort_keys=False) + "```",
        "## Final metrics\n\n" + _metrics_table(final_metrics),
        "## Plots\n\n" + _plot_links(run_dir),
        "## Reproduce\n\n```bash\n" + (command if isinstance(command, str) else shlex.join(command)) + "\n```",
    ]
    path = run_dir / "README.md"
    atomic_write_text(path, "\n\n".join(section.strip("\n") for section in sections) + "\n")
    return path


def _adapter(run_dir: Path) -> dict:
    """The config of the LoRA adapters a run saved (with --lora-r, or trained on from the adapter folder it
    started from)."""
    try:
        return json.loads((run_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}


def _front_matter(config: TrainConfig, adapter: dict | None = None) -> str:
    meta: dict = {}
    # The Hub rejects a card whose base_model is not a model id; a local folder is named in the text instead.
    if base := base_model(config.model):
        meta["base_model"] = base
    meta["datasets"] = [_dataset_name(config.data)]
    meta["library_name"] = "peft" if adapter is not None else "preftune"  # the Hub loads adapters with peft
    meta["pipeline_tag"] = "text-classification" if config.stage == "rm" else "text-generation"
    meta["tags"] = ["preftune", config.stage] + (["lora"] if adapter is not None or config.lora_r else [])
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---"


def _summary(config: TrainConfig, adapter: dict | None = None) -> str:
    steps = f"{config.max_steps} optimizer steps" if config.max_steps > 0 else f"{config.epochs:g} epoch(s)"
    if config.lora_r:
        weights = f"LoRA adapters (rank {config.lora_r}, alpha {config.lora_alpha:g})"
    elif adapter is not None:
        weights = (f"the LoRA adapters it started with (rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}), "
                   f"over the base model they name")
    else:
        weights = "all weights"
    if config.stage == "dpo":
        what = (f"Preference-tuned with DPO (loss `{config.loss}`, β = {config.beta:g}) against the reference model "
                f"`{config.ref_model or config.model}`")
    elif config.stage == "kto":
        what = (f"Tuned on unpaired feedback with KTO (β = {config.beta:g}, desirable weight "
                f"{config.desirable_weight:g}, undesirable weight {config.undesirable_weight:g}) against the "
                f"reference model `{config.ref_model or config.model}`")
    elif config.stage == "rm":
        load = ("load it with `preftune score`, from `merged/` when written, or as "
                "AutoModelForSequenceClassification of the base with num_labels=1 and pad_token_id set to this "
                "folder's tokenizer's, then peft's PeftModel.from_pretrained" if adapter is not None or config.lora_r
                else "load it with AutoModelForSequenceClassification")
        what = (f"A Bradley-Terry reward model (a scalar score head; {load})"
                + (f", rewards centred with coefficient {config.center_rewards:g}" if config.center_rewards else ""))
    else:
        what = "Supervised fine-tuning (SFT)"
    return (f"{what}, starting from `{config.model}` on `{config.data}`. Trained {weights} for {steps} at a peak "
            f"learning rate of {config.learning_rate:g}, batch size {config.batch_size} × {config.grad_accum} "
            f"accumulation, with preftune {__version__}.")


def _metrics_table(metrics: dict) -> str:
    if not metrics:
        return "No metrics were recorded."
    lines = ["| metric | value |", "| --- | --- |"]
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append("| " + " | ".join(_cell(text) for text in (str(key), shown)) + " |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _plot_links(run_dir: Path) -> str:
    # In the order the run is read: loss first, evaluation last; any other PNG after them.
    rank = {name: i for i, name in enumerate(PLOT_NAMES)}
    plots = sorted((run_dir / PLOTS_DIR).glob("*.png"), key=lambda p: (rank.get(p.stem, len(rank)), p.name))
    if not plots:
        return f"No plots; `preftune plot {shlex.quote(str(run_dir))}` draws them from metrics.jsonl."
    return "\n\n".join(f"![{p.stem.replace('_', ' ')}]({PLOTS_DIR}/{p.name})" for p in plots)


def base_model(model: str) -> str | None:
    """The Hub id the run started from: `model` itself, or, when it is a local preftune run folder (DPO after
    SFT), the model that run started from, followed back. None when the chain ends in a local folder."""
    for _ in range(8):  # a chain of runs; the bound only guards against a folder naming itself
        if looks_like_hub_id(model):
            return model
        try:
            model = yaml.safe_load((Path(model).expanduser() / "config.yaml").read_text())["model"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return None
        if not isinstance(model, str):
            return None
    return None


def _dataset_name(data: str) -> str:
    """A Hub dataset id as it is; a local file by its name only (a path on this machine means nothing on the Hub)."""
    return data if looks_like_hub_id(data) else Path(data).name


def _data_counts(stats: dict) -> str:
    train = stats.get("train", {})
    lines = [f"- format: {stats.get('format')}",
             f"- training records: {train.get('total', 0)}, of which {train.get('truncated', 0)} truncated to fit "
             f"max_length and {train.get('dropped', 0)} dropped (prompt alone longer than max_length)",
             f"- records skipped as malformed: {stats.get('skipped_records', 0)}"]
    if "eval" in stats:
        ev = stats["eval"]
        lines.append(f"- eval records: {ev.get('total', 0)}, of which {ev.get('truncated', 0)} truncated and "
                     f"{ev.get('dropped', 0)} dropped")
    return "\n".join(lines)


def _results(final_metrics: dict) -> str:
    numbers = headline(final_metrics)
    if not numbers:
        return "No metrics were recorded."
    if any(k.startswith("eval_") for k in numbers):
        where = "On the held-out pairs at the end of training:"
    else:
        where = f"Training metrics, mean of the last {final_metrics.get('mean_over_steps')} steps (no eval data):"
    return where + "\n\n" + "\n".join(f"- {k}: {v:.4g}" for k, v in numbers.items())
