"""Run configuration: one typed dataclass, validated on construction; YAML in, YAML out.

Every field is also a command-line flag (`output_dir` -> `--output-dir`); flags override a `--config` file.
The resolved config is written to the run folder as `config.yaml`, which `--config` accepts back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

STAGES = ("sft", "dpo", "kto", "rm")
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("auto", "mixed", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
# A stage's learning rate when none is given: SFT moves weights a lot, DPO gently (Rafailov et al. use 5e-7..1e-6).
# KTO and rm: the defaults of TRL's KTOConfig and RewardConfig.
DEFAULT_LR = {"sft": 2e-5, "dpo": 5e-7, "kto": 1e-6, "rm": 1e-4}


# The stages on which a field has an effect, for the fields that not every stage reads. Set to anything but its
# default on another stage's run, such a field is an error rather than a setting silently ignored.
FIELD_STAGES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("loss", "label_smoothing", "simpo_gamma", "sft_weight"), ("dpo",)),
    **dict.fromkeys(("ref_model", "beta", "precompute_ref", "ref_cache_dir"), ("dpo", "kto")),
    "data_format": ("dpo", "kto", "rm"),
    "min_score_gap": ("dpo", "rm"),
    **dict.fromkeys(("desirable_weight", "undesirable_weight", "paired_as_unpaired"), ("kto",)),
    "center_rewards": ("rm",),
}


def stages_of(name: str) -> tuple[str, ...]:
    """The stages on which the field `name` has an effect."""
    return FIELD_STAGES.get(name, STAGES)


def applies_to(name: str, stage: str) -> bool:
    """Whether the field `name` has any effect on a run of `stage`."""
    return stage in stages_of(name)


def unknown_key(key, known, where: str) -> ConfigError:
    """The error for a config key that is none of `known`: the nearest known name, or what TRL's name is here."""
    hint = difflib.get_close_matches(str(key), list(known), n=1)
    tip = f"; did you mean {hint[0]!r}?" if hint else ""
    if key in TRL_NAMES:
        tip = f"; that is TRL's name: here it is {TRL_NAMES[key]}"
    return ConfigError(f"{where}: unknown key {key!r}{tip}")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


# Names from TRL's and transformers' training arguments, and what this config calls them (for the error a
# key of theirs meets here).
TRL_NAMES = {
    "learning_rate": "'lr'", "per_device_train_batch_size": "'batch_size' (per process)",
    "gradient_accumulation_steps": "'grad_accum'", "num_train_epochs": "'epochs'",
    "lr_scheduler_type": "'scheduler' (constant, linear or cosine)", "loss_type": "'loss'",
    "rpo_alpha": "'sft_weight'", "logging_steps": "'log_every'", "save_steps": "'save_every'",
    "eval_steps": "'eval_every'", "save_total_limit": "'keep_checkpoints'", "bf16": "dtype='bfloat16'",
    "fp16": "dtype='float16'", "precompute_ref_log_probs": "'precompute_ref'", "padding_free": "'packing'",
    "center_rewards_coefficient": "'center_rewards'", "dataset_num_proc": "'tokenize_procs'",
    "max_completion_length": "'max_length' (prompt + answer)",
    "model_name_or_path": "'model'", "ref_model_name_or_path": "'ref_model'", "dataset_name": "'data'",
    "peft_config": "'lora_r', 'lora_alpha', 'lora_dropout' and 'lora_targets' (or pass a peft model as the model)",
    "use_peft": "'lora_r' (the LoRA rank; 0 trains every weight)",
}


@dataclass
class TrainConfig:
    """Everything a training run needs. Units: steps are optimizer steps; lengths are tokens."""

    # --- what to train, on what, where
    stage: str = _f("dpo", "Training stage: sft, dpo, kto or rm (reward model).", choices=STAGES)
    model: str = _f("", "Model to start from: a local Hugging Face folder or a Hub id.")
    data: str = _f("", "Training data: a file (.jsonl/.json/.parquet/.csv/.tsv, optionally .gz), a folder or a Hub id.")
    output_dir: str = _f("", "Run folder: the final model, config.yaml, metrics.jsonl and plots go here.")
    ref_model: str | None = _f(None, "Reference model for DPO (default: the starting model).")
    tokenizer: str | None = _f(None, "Tokenizer to use (default: the model's).")
    # --- data
    data_format: str | None = _f(None, "Force a data format instead of detecting it.")
    split: str = _f("train", "Split to read when --data is a Hub id or a saved dataset.")
    eval_data: str | None = _f(None, "Held-out data for evaluation.")
    eval_split: float = _f(0.0, "Fraction of --data held out for evaluation when --eval-data is not given.")
    skip_bad_records: bool = _f(False, "Drop malformed records (and report how many) instead of stopping.")
    min_score_gap: float | None = _f(None, "Drop pairs whose chosen/rejected score gap is below this.")
    max_length: int = _f(1024, "Longest prompt+answer in tokens; answers are cut from the right.")
    max_prompt_length: int | None = _f(None, "Longest prompt in tokens; prompts are cut from the left.")
    raw_text_prompts: bool = _f(False, "Feed orca/alpaca-style records (system, question, answer as text fields) "
                                       "as raw text instead of through the tokenizer's chat template.")
    sft_last_turn_only: bool = _f(False, "SFT on a conversation trains on the last assistant turn only, not on "
                                         "every assistant turn.")
    tokenize_procs: int = _f(0, "Processes that tokenise the data; 0 = auto (one per CPU core, at most 8, from "
                                "10,000 records up), 1 = in this process.")
    token_cache: bool = _f(True, "Keep tokenised data on disk, keyed by tokenizer, data file and settings, so the "
                                 "next run on the same data starts at once; --no-token-cache turns it off.")
    token_cache_dir: str | None = _f(None, "Where tokenised data is kept (default: ~/.cache/preftune/tokenized).")
    # --- optimisation
    max_steps: int = _f(-1, "Optimizer steps to run; -1 runs --epochs over the data.")
    epochs: float = _f(1.0, "Passes over the data when --max-steps is -1. An epoch is whole optimizer steps "
                            "(batch_size x grad_accum x processes): the examples short of a full last step are left "
                            "out of it (others each epoch), and data smaller than one step is refused.")
    batch_size: int = _f(8, "Pairs (DPO) or sequences (SFT) per micro-batch, per process.")
    grad_accum: int = _f(1, "Micro-batches accumulated into one optimizer step.")
    lr: float | None = _f(None, "Peak learning rate; the default depends on the stage (2e-5 SFT, 5e-7 DPO, 1e-6 "
                                "KTO).")
    warmup_steps: int = _f(0, "Steps of linear warmup from 0 to --lr (the first step runs at 0, as transformers' "
                              "schedules do).")
    warmup_ratio: float = _f(0.0, "Warmup as a fraction of the run's steps, rounded up (0.1), in place of "
                                  "--warmup-steps.")
    scheduler: str = _f("cosine", "Decay after warmup: cosine, linear or constant.", choices=SCHEDULERS)
    weight_decay: float = _f(0.0, "AdamW weight decay of the weight matrices (norms and biases are not decayed, "
                                  "as in transformers' Trainer).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this; 0 disables clipping.")
    seed: int = _f(42, "Seed for weights of new heads, data order and dropout.")
    # --- preference loss
    loss: str = _f("sigmoid", "Preference loss, or a weighted mix like 'sigmoid:0.8,bco_pair:0.2'.")
    beta: float = _f(0.1, "DPO temperature: strength of the pull toward the reference.")
    label_smoothing: float = _f(0.0, "Assumed rate of flipped labels (conservative DPO, robust DPO).")
    simpo_gamma: float = _f(0.5, "Target reward margin of SimPO.")
    sft_weight: float = _f(0.0, "Weight of an NLL term on the chosen answers (RPO).")
    # --- KTO (unpaired feedback)
    desirable_weight: float = _f(1.0, "KTO: weight of the loss on desirable answers.")
    undesirable_weight: float = _f(1.0, "KTO: weight of the loss on undesirable answers.")
    paired_as_unpaired: bool = _f(False, "KTO: read a file of preference pairs as unpaired feedback, each pair "
                                         "giving one desirable (chosen) and one undesirable (rejected) example.")
    # --- reward model
    center_rewards: float = _f(0.0, "Reward model: weight of coef * mean((r_chosen + r_rejected)^2), which pulls "
                                    "rewards toward zero mean (TRL's center_rewards_coefficient; 0.01 is usual).")
    # --- model, precision, speed
    dtype: str = _f("auto", "Precision: mixed (fp32 trained weights, bf16 compute, bf16 frozen weights), float32, "
                            "bfloat16, float16; auto = mixed on bf16 GPUs, float32 elsewhere.", choices=DTYPES)
    device: str = _f("auto", "Device: auto (cuda > mps > cpu), cpu, cuda or mps.", choices=DEVICES)
    trust_remote_code: bool = _f(False, "Allow model code from the model folder or the Hub to run.")
    prefix_sharing: bool = _f(True, "Compute each prompt once for chosen and rejected where the planner finds it "
                                    "cheaper than one plain batch (nearly always on a CPU).")
    logits_chunk_size: int = _f(1024, "Answer tokens projected to the vocabulary at a time.")
    trim_padding: bool = _f(True, "Run each batch as sub-batches of similar length so padding is not computed.")
    packing: bool = _f(True, "On a CPU, run each batch as one row without padding (prompts once, answers after "
                             "them, attention per pair) where the model's attention allows it; needs prefix sharing "
                             "and trimmed padding. --no-packing takes the padded layouts.")
    precompute_ref: bool = _f(False, "Compute reference log-probs once before training and cache them on disk.")
    ref_cache_dir: str | None = _f(None, "Where cached reference log-probs live (default: ~/.cache/preftune/ref).")
    group_by_length: bool = _f(False, "Batch pairs of similar length together to cut padding.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    disable_dropout: bool = _f(True, "DPO: turn the model's dropout off in policy and reference (as TRL does), so a "
                                     "policy equal to its reference gives loss log 2; --no-disable-dropout keeps it.")
    compile: bool = _f(False, "torch.compile the decoders of policy and reference (plain layout; takes minutes).")
    fused_norms: bool = _f(False, "Run the RMS norms of Llama-style families (Llama, Mistral, Qwen2/3, Phi-3, ...) "
                                  "with a hand-written backward: equal results, fewer operators and saved "
                                  "activations; off unless asked, as the CPU benchmark's step time does not change.")
    fused_mlps: bool = _f(True, "Run the gated MLPs of Llama-style families (Llama, Mistral, Qwen2/3, Gemma, OLMo, "
                                "...) keeping two of their four [tokens, intermediate] tensors for backward and "
                                "recomputing the others: equal results, half the MLPs' activation memory (with "
                                "--compile the compiler decides).")
    router_aux_loss_coef: float | None = _f(None, "Mixture-of-experts models: weight of the router load-balancing "
                                                  "loss added to the training loss and logged as aux_loss (as TRL "
                                                  "does); default: the model config's coefficient; 0 turns it off.")
    # --- LoRA and scale
    lora_r: int = _f(0, "LoRA rank; 0 trains all weights.")
    lora_alpha: float = _f(16.0, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_targets: str = _f("all-linear", "Comma-separated module names for LoRA (in a config, a list too), or "
                                         "all-linear.")
    merge: bool = _f(False, "With LoRA (--lora-r, or a model that brings its adapters), also save a merged full "
                                 "model.")
    load_in_4bit: bool = _f(False, "Load the base model in 4 bits (QLoRA; CUDA only).")
    fsdp: bool = _f(False, "Shard policy and reference with FSDP2 under torchrun.")
    # --- evaluation, checkpoints, reporting
    eval_every: int = _f(0, "Evaluate on held-out pairs every N steps; 0 evaluates only at the end.")
    log_every: int = _f(1, "Print a progress line every N steps when the output is not a terminal.")
    save_every: int = _f(0, "Write a checkpoint every N steps; 0 writes none.")
    keep_checkpoints: int = _f(2, "Checkpoints kept; older ones are deleted.")
    resume: bool = _f(False, "Continue from the newest complete checkpoint in --output-dir; from step 0 if there is "
                             "none yet, and nothing to do if the run has finished.")
    overwrite: bool = _f(False, "Start afresh even if --output-dir holds a run.")
    skip_nonfinite: bool = _f(False, "Skip steps whose loss or gradients are not finite instead of stopping "
                                     "(no update; counted as skipped_steps in the metrics).")
    quiet: bool = _f(False, "Print only errors and the final line.")
    report_to: str = _f("", "Extra metric sinks, comma-separated: tensorboard, wandb.")

    def __post_init__(self) -> None:
        for f in fields(self):  # built in Python, a value may be of any type: "2" reads as from YAML, True fails
            setattr(self, f.name, coerce_field(f, getattr(self, f.name), "TrainConfig"))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.stage not in STAGES:  # before the per-stage checks, which would read it as a stage
            raise ConfigError(f"stage: {self.stage!r} is not one of {', '.join(STAGES)}")
        for f in fields(self):
            if not applies_to(f.name, self.stage) and getattr(self, f.name) != f.default:
                stages = stages_of(f.name)
                raise ConfigError(f"{f.name}: applies to {' and '.join(s.upper() for s in stages)} only, and this "
                                  f"is a {self.stage} run; drop --{f.name.replace('_', '-')} (or run "
                                  f"`preftune {stages[0]}`)")
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(choices)}")
        if self.tokenize_procs < 0:
            raise ConfigError(f"tokenize_procs: must be 0 (auto) or more, got {self.tokenize_procs}")
        positive = ("batch_size", "grad_accum", "max_length", "logits_chunk_size", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "weight_decay", "max_grad_norm", "label_smoothing", "sft_weight",
                        "center_rewards", "eval_every", "save_every", "lora_r", "lora_dropout")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")
        if self.lora_dropout >= 1:
            raise ConfigError(f"lora_dropout: a probability, must be below 1, got {self.lora_dropout}")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ConfigError(f"router_aux_loss_coef: must not be negative, got {self.router_aux_loss_coef}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps: must be positive, or -1 to use epochs; got {self.max_steps}")
        if self.resume and self.overwrite:
            raise ConfigError("resume: --resume continues the run in --output-dir and --overwrite starts it afresh; "
                              "pass one of them")
        if self.eval_data and self.eval_split:
            raise ConfigError("eval_split: with --eval-data the held-out pairs come from that file; drop "
                              "--eval-split (or --eval-data to hold out part of --data)")
        if self.lora_r and self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha: must be positive, got {self.lora_alpha:g}")
        if self.max_steps == -1 and self.epochs <= 0:
            raise ConfigError(f"epochs: must be positive, got {self.epochs}")
        floats = [f.name for f in fields(self) if isinstance(getattr(self, f.name), float)]
        for name in floats:  # NaN passes every comparison below, and infinity trains nothing
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}: must be a finite number, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr: must be positive, got {self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps < 0:
            raise ConfigError(f"adam_eps: must not be negative, got {self.adam_eps}")
        if not -2 ** 63 <= self.seed < 2 ** 64:  # what torch.manual_seed takes
            raise ConfigError(f"seed: must be a 64-bit integer, got {self.seed}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError("desirable_weight, undesirable_weight: must be positive, got "
                              f"{self.desirable_weight:g} and {self.undesirable_weight:g}")
        if self.stage == "kto" and self.batch_size < 2:
            # Its KL estimate pairs each prompt with another example's answer from the same batch (as TRL does).
            raise ConfigError("batch_size: KTO needs at least 2 examples a batch, to estimate its KL term from "
                              f"mismatched prompt/answer pairs; got {self.batch_size}")
        if self.beta <= 0:
            raise ConfigError(f"beta: must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and self.warmup_steps:
            raise ConfigError("warmup_ratio: the warmup is given twice, also as warmup_steps; keep one")
        if not 0 <= self.eval_split < 1:
            raise ConfigError(f"eval_split: must be in [0, 1), got {self.eval_split}")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"max_prompt_length: must be between 1 and max_length-1 ({self.max_length - 1}), "
                              f"got {self.max_prompt_length}")
        self._check_loss_fields()
        if self.stage == "rm" and self.fsdp:
            raise ConfigError("fsdp: not yet for reward models; train rm on one process or with plain data "
                              "parallelism (torchrun without --fsdp)")
        if self.load_in_4bit and not self.lora_r:
            raise ConfigError("load_in_4bit: 4-bit weights cannot be trained directly; set --lora-r too")

    def _check_loss_fields(self) -> None:
        """An unknown loss name, listing the known ones; on a DPO run, a field that none of its losses reads."""
        from .losses import LOSSES, parse_loss_spec

        names = [name for name, _ in parse_loss_spec(self.loss)]
        if self.stage != "dpo":
            return
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("label_smoothing", "simpo_gamma"):
            if getattr(self, name) != defaults[name] and not any(name in LOSSES[n].reads for n in names):
                readers = ", ".join(n for n, spec in LOSSES.items() if name in spec.reads)
                raise ConfigError(f"{name}: no loss of {self.loss!r} reads it (it applies to {readers}); drop "
                                  f"--{name.replace('_', '-')}, or choose one of those losses")
        if not any(LOSSES[n].needs_reference for n in names):
            for name in ("ref_model", "precompute_ref", "ref_cache_dir"):
                if getattr(self, name) != defaults[name]:
                    raise ConfigError(f"{name}: loss {self.loss!r} compares with no reference model; drop "
                                      f"--{name.replace('_', '-')} (or choose a loss that uses a reference)")

    def require_paths(self) -> None:
        """The fields a training run cannot start without."""
        for name in ("model", "data", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required; pass --{name.replace('_', '-')} or set it in --config")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.stage]

    # ------------------------------------------------------------------ YAML
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config") -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        for key in values:
            if key not in known:
                raise unknown_key(key, known, where)
        coerced = {key: coerce_field(known[key], value, where) for key, value in values.items()}
        return cls(**coerced)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(load_yaml_mapping(path), where=str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key given twice in one mapping (it would keep the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # plain keys as written; merge keys (<<) may be overridden, as YAML allows
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if (key_node.tag, key_node.value) in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key_node.value!r} is given "
                                                            "twice; keep one", key_node.start_mark)
                seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep=deep)


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def flag_help(f: dataclasses.Field, stage: str) -> str:
    """The --help text of a field's flag on `stage`'s command: its help and one default, the one that applies."""
    text = f.metadata.get("help", "")
    if f.name == "lr":
        return f"Peak learning rate (default: {DEFAULT_LR[stage]:g})."
    if f.name == "loss":
        from .losses import LOSS_ALIASES, LOSSES

        names = ", ".join([*LOSSES, *(f"{a} (= {n})" for a, n in LOSS_ALIASES.items())])
        text += f" Losses: {names}."
    default = f.default
    if default is None or default == "" or "default:" in text:  # no value, or the help says what happens
        return text
    if isinstance(default, bool):
        default = str(default).lower()
    return f"{text} (default: {default})"


# Text fields that hold a comma-separated list: a list of strings is taken too.
COMMA_LISTS = ("lora_targets", "report_to", "loss")


def field_type(f: dataclasses.Field) -> type:
    """The plain Python type of a config field (`int | None` -> int)."""
    text = str(f.type).replace(" ", "")
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.split("|")[0] == name:
            return typ
    raise TypeError(f"unsupported config field type {f.type!r}")


def coerce_field(f: dataclasses.Field, value: Any, where: str) -> Any:
    """`value` as the type of config field `f` (YAML and flags give strings, ints for floats, ...)."""
    typ = field_type(f)
    if value is None:
        if "None" in str(f.type):
            return None
        raise ConfigError(f"{where}: {f.name} must not be empty")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {f.name} must be true or false, got {value!r}")
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-6 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is int and isinstance(value, str):
        try:  # a quoted whole number, as a quoted float above: "2" and 2 mean the same
            return int(value.strip(), 10)
        except ValueError:
            pass
    if typ is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if typ is str and f.name in COMMA_LISTS and isinstance(value, (list, tuple)) and \
            all(isinstance(v, str) for v in value):
        return ",".join(value)  # a YAML or Python list of what the flag takes comma-separated
    raise ConfigError(f"{where}: {f.name} must be {typ.__name__}, got {value!r}")
