"""Settings of an online run: the rounds (OnlineConfig) and the DPO steps of each round (a TrainConfig).

One flat mapping holds both, in YAML and on the command line: the keys below are the rounds' settings; any other
key is a `TrainConfig` field of the DPO stage (beta, lr, loss, batch_size, ...), except those the rounds set
themselves (NOT_DPO_KEYS).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..config import TrainConfig, _f, coerce_field, unknown_key
from ..errors import ConfigError

REF_UPDATES = ("none", "round")
# TrainConfig fields that each round fills in itself, so they are not settings of an online run.
NOT_DPO_KEYS = {
    "stage": "online training is DPO",
    "data": "each round trains on the pairs it made; give prompts with --prompts",
    "eval_data": "give held-out prompts with --eval-prompts",
    "eval_split": "an online run's eval_split holds out prompts",
    "max_steps": "use --steps-per-round",
    "epochs": "use --steps-per-round",
    "ref_model": "the reference is --model (or the last round's policy with --ref-update round)",
    "resume": "an online run's resume continues its rounds",
    "overwrite": "an online run's overwrite starts it afresh",
    "output_dir": "rounds train in OUTPUT_DIR/rounds/NNN/train",
    **dict.fromkeys(("lora_r", "lora_alpha", "lora_dropout", "lora_targets"),
                    "online rounds train all weights for now"),
    "load_in_4bit": "online rounds train all weights for now",
    "merge": "online rounds train all weights for now",
    "fsdp": "online rounds run in one process for now",
    "data_format": "each round's pairs are prompt/chosen/rejected records",
    "skip_bad_records": "a bad prompt record stops the run, naming it",
    "min_score_gap": "pairs are best against worst; tied groups are skipped",
    "raw_text_prompts": "prompts are text or messages",
    "sft_last_turn_only": "online training is DPO",
    "eval_every": "held-out prompts are judged after every round",
    "precompute_ref": "each round's pairs are new, so a cache would not be reused",
    "ref_cache_dir": "each round's pairs are new, so a cache would not be reused",
}


@dataclass
class OnlineConfig:
    """The rounds: generate `samples` answers per prompt with the current policy, judge, pair best against worst,
    train `steps_per_round` DPO steps. `dpo` holds the DPO stage's settings as TrainConfig fields."""

    model: str = _f("", "Model to start from (the SFT model): a local folder or a Hub id; also the reference.")
    prompts: str = _f("", "Prompts: records with 'prompt' (text or messages) and optional 'system', or a preference "
                          "file; any source --data takes (--split picks a saved dataset's or Hub id's split).")
    output_dir: str = _f("", "Run folder: rounds/NNN/ (samples, pairs, training), metrics.jsonl, the final model.")
    judge: str = _f("", "rule:NAME (longer, shorter, contains:TEXT, count:TEXT), python:module:function, "
                        "python:path/file.py:function or reward-model:DIR.")
    samples: int = _f(4, "Answers generated per prompt each round.")
    rounds: int = _f(3, "Rounds of generate, judge, pair, train.")
    steps_per_round: int = _f(50, "DPO optimizer steps per round (the round's pairs are repeated as needed).")
    max_new_tokens: int = _f(256, "Longest generated answer in tokens.")
    pair_cut_answers: bool = _f(False, "Pair answers cut off at --max-new-tokens too; each is trained as if it "
                                       "ended where it was cut. By default they are judged but never paired.")
    temperature: float = _f(0.8, "Sampling temperature of the round's answers.")
    top_p: float = _f(1.0, "Nucleus sampling mass.")
    generation_batch_size: int = _f(16, "Prompts per generation batch.")
    ref_update: str = _f("none", "none: the reference stays the starting model; round: each round's reference is "
                                 "the policy it started from.", choices=REF_UPDATES)
    eval_prompts: str | None = _f(None, "Held-out prompts, answered greedily and judged after every round.")
    eval_split: float = _f(0.0, "Share of --prompts held out for evaluation when --eval-prompts is not given.")
    resume: bool = _f(False, "Continue the run in --output-dir: finished rounds are kept, the current round goes on "
                             "from its pairs and its last checkpoint.")
    overwrite: bool = _f(False, "Start afresh even if --output-dir holds a run.")
    quiet: bool = _f(False, "Print only errors and the final line.")
    dpo: dict = field(default_factory=dict, metadata={"help": "TrainConfig fields of each round's DPO steps."})

    def __post_init__(self) -> None:
        for name in ("samples", "rounds", "steps_per_round", "max_new_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.samples < 2:
            raise ConfigError("samples: must be at least 2 (a pair needs two answers to compare)")
        if not (math.isfinite(self.temperature) and self.temperature > 0):  # NaN passes `<= 0` unrefused
            raise ConfigError(f"temperature: must be a positive number, got {self.temperature}; greedy decoding "
                              "gives every sample the same answer")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.ref_update not in REF_UPDATES:
            raise ConfigError(f"ref_update: {self.ref_update!r} is not one of {', '.join(REF_UPDATES)}")
        if not 0 <= self.eval_split < 1:
            raise ConfigError(f"eval_split: must be in [0, 1), got {self.eval_split}")
        if self.resume and self.overwrite:
            raise ConfigError("resume: --resume continues the run in --output-dir and --overwrite starts it afresh; "
                              "pass one of them")
        if self.eval_prompts and self.eval_split:
            raise ConfigError("eval_split: give --eval-prompts or --eval-split, not both")
        for key in self.dpo:
            if key in NOT_DPO_KEYS:
                raise ConfigError(f"{key}: not a setting of online training ({NOT_DPO_KEYS[key]})")
        self.train_config(output_dir="", model=self.model or "x")  # DPO settings are checked now, not in round 1

    def require_paths(self) -> None:
        for name in ("model", "prompts", "output_dir", "judge"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required; pass --{name.replace('_', '-')} or set it in --config")

    def train_config(self, *, output_dir: str, model: str, ref_model: str | None = None,
                     resume: bool = False) -> TrainConfig:
        """The TrainConfig of one round's DPO steps."""
        values = {**self.dpo, "stage": "dpo", "model": model, "ref_model": ref_model, "data": "<round pairs>",
                  "output_dir": output_dir, "max_steps": self.steps_per_round, "resume": resume,
                  "quiet": self.quiet}
        from ..losses import needs_reference  # here: the command line reads these settings before torch loads

        if not needs_reference(str(values.get("loss") or TrainConfig.loss)):
            values["ref_model"] = None  # the rounds' reference, for losses that use none (simpo, orpo)
        return TrainConfig.from_dict(values, where="online")

    @property
    def seed(self) -> int:
        return self.train_config(output_dir="", model="x").seed

    # ------------------------------------------------------------------ dict / YAML
    @classmethod
    def from_dict(cls, values: dict, *, where: str = "config") -> "OnlineConfig":
        """From one flat mapping: the rounds' keys here, every other key a DPO TrainConfig field."""
        own = {f.name: f for f in fields(cls) if f.name != "dpo"}
        mine = {k: coerce_field(own[k], v, where) for k, v in values.items() if k in own}
        dpo = dict(values.get("dpo") or {})
        if misplaced := [key for key in dpo if key in own]:
            raise ConfigError(f"{where}: dpo.{misplaced[0]}: {misplaced[0]!r} is a setting of the online run, not of "
                              "its DPO steps; give it at the top level, beside 'dpo'")
        dpo.update({k: v for k, v in values.items() if k not in own and k != "dpo"})
        steps = {f.name for f in fields(TrainConfig)}
        for key in dpo:
            if key not in steps:  # a typo of either kind of key: the nearest name of both
                raise unknown_key(key, [*own, *steps], where)
        if dpo.get("stage") == "online":
            del dpo["stage"]
        return cls(**mine, dpo=dpo)

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dpo"}
        return {"stage": "online", **values, **self.dpo}

    def written(self) -> dict:
        """`to_dict` with local paths absolute, so that `--config` (and `--resume`) finds the same model, prompts,
        judge and run folder from any folder: what `to_yaml` writes, and what a resume compares."""
        from ..io import absolute_if_local

        values = self.to_dict()
        for name in ("model", "prompts", "eval_prompts", "output_dir", "tokenizer"):
            if isinstance(values.get(name), str):
                values[name] = absolute_if_local(values[name])
        values["judge"] = judge_with_absolute_path(values["judge"])
        return values

    def to_yaml(self, path: Path) -> None:
        from ..io import atomic_write_text

        values = {**self.written(), "resume": False, "overwrite": False}
        atomic_write_text(Path(path), yaml.safe_dump(values, sort_keys=False))


def judge_with_absolute_path(spec: str) -> str:
    """A judge spec whose folder or file (reward-model:DIR, python:path/file.py:function) is written absolute."""
    from ..io import absolute_if_local

    kind, _, rest = (spec or "").partition(":")
    if kind == "reward-model" and rest:
        return f"reward-model:{absolute_if_local(rest)}"
    if kind == "python" and rest:
        where, _, name = rest.rpartition(":")
        if where.endswith(".py"):
            return f"python:{absolute_if_local(where)}:{name}"
    return spec


def field_names() -> list[str]:
    return [f.name for f in fields(OnlineConfig) if f.name != "dpo"]


def online_field(name: str) -> dataclasses.Field:
    return {f.name: f for f in fields(OnlineConfig)}[name]
