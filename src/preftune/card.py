"""RUN/README.md: a Hugging Face model card, so a run folder pushed to the Hub explains itself."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

import yaml

from . import __version__
from .config import TrainConfig
from .io import atomic_write_text
from .models import looks_like_hub_id
from .plots import PLOT_NAMES, PLOTS_DIR


def write_model_card(run_dir: Path, config: TrainConfig, final_metrics: dict, command: str | Sequence[str]) -> Path:
    """Write RUN/README.md: metadata block, what was trained, config, final metrics, plots, the command.

    `command` is the command line that reproduces the run: a string as typed, or an argv list that is
    shell-quoted here. Plots are linked only if they exist, so write the plots first.
    """
    run_dir = Path(run_dir)
    sections = [
        _front_matter(config),
        f"# {run_dir.resolve().name}\n\n{_summary(config)}",
        "## Training config\n\n```yaml\n" + yaml.safe_dump(config.to_dict(), sort_keys=False) + "```",
        "## Final metrics\n\n" + _metrics_table(final_metrics),
        "## Plots\n\n" + _plot_links(run_dir),
        "## Reproduce\n\n```bash\n" + (command if isinstance(command, str) else shlex.join(command)) + "\n```",
    ]
    path = run_dir / "README.md"
    atomic_write_text(path, "\n\n".join(section.strip("\n") for section in sections) + "\n")
    return path


def _front_matter(config: TrainConfig) -> str:
    meta: dict = {}
    # The Hub rejects a card whose base_model is not a model id; a local folder is named in the text instead.
    if _is_hub_id(config.model):
        meta["base_model"] = config.model
    meta["datasets"] = [config.data]
    meta["library_name"] = "preftune"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["preftune", config.stage] + (["lora"] if config.lora_r else [])
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---"


def _summary(config: TrainConfig) -> str:
    steps = f"{config.max_steps} optimizer steps" if config.max_steps > 0 else f"{config.epochs:g} epoch(s)"
    weights = f"LoRA adapters (rank {config.lora_r}, alpha {config.lora_alpha:g})" if config.lora_r else "all weights"
    if config.stage == "dpo":
        what = (f"Preference-tuned with DPO (loss `{config.loss}`, β = {config.beta:g}) against the reference model "
                f"`{config.ref_model or config.model}`")
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


def _is_hub_id(model: str) -> bool:
    return looks_like_hub_id(model)
