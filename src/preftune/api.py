"""The Python API: `train`, `evaluate`, `score`, `load_pairs`. The command line is a thin layer over these.

Models, tokenizers and data may be objects built in code or paths; a call with paths computes exactly what the
matching `preftune` command computes (same losses, same weights). Errors are `preftune.errors` exceptions
carrying the command line's one-line messages; nothing here exits the process, and nothing prints unless
`quiet=False`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import STAGES, TrainConfig, load_yaml_mapping
from .data import load as data_load
from .data.memory import as_source, is_path
from .data.records import PreferencePair
from .data.tokenize import tokenize_all
from .errors import ConfigError, PreftuneError
from .metrics import logps_table, per_pair_rows, preference_metrics
from .inputs import RunInputs, carries_injected_adapters, check_model_object, is_peft_model, placeholder
from .models.load import check_source, freeze, given_tokenizer, load_model, load_tokenizer
from .models.narrow import require_items_fit
from .models.precision import pick_device, pick_dtype
from .report.tracking import METRICS_FILE
from .scoring import ScoreReport, score_records
from .training.loop import execute
from .training.run_dir import DATA_STATS
from .training.setup import release

Callback = Callable[[dict], Any]
_ARGUMENTS = ("model", "data", "tokenizer", "ref_model", "eval_data", "output_dir")


@dataclass
class TrainResult:
    """What `train` returns.

    `model`: the trained model (a peft model under LoRA), on its device, in eval mode. `tokenizer`: the one it
    was trained with. `metrics`: the last training row, updated with the final eval row when there was eval
    data. `history`: every metrics row in order, as in metrics.jsonl (eval rows hold `eval_*` keys).
    `output_dir`: the run folder, or None for a run in memory. `stopped_at_step`: set when a callback (or a
    signal) stopped the run before its last step. `data_stats`: what of the data the run trained on, as the run
    folder's data_stats.json holds it: records and examples truncated or dropped (`train`, `eval`), records
    skipped (`skipped_records`), the layout read (`format`) and the planned `steps`.
    """

    model: Any
    tokenizer: Any
    metrics: dict
    history: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    stopped_at_step: int | None = None
    data_stats: dict = field(default_factory=dict)


@dataclass
class EvalReport:
    """What `evaluate` returns: `summary`, the metrics `preftune eval` prints, and `rows`, one dict a pair
    with the keys of `preftune eval --output` (summed answer log-probs of policy and reference)."""

    summary: dict
    rows: list[dict]


class _ConfigOrNone:
    """`train`'s default output_dir: the config's, if it gives one, else None (in memory). An explicit None trains
    in memory whatever the config says."""

    def __repr__(self) -> str:
        return "<the config's output_dir, else None>"


CONFIG_OR_NONE = _ConfigOrNone()


def train(stage: str, *, model=None, data=None, tokenizer=None, ref_model=None, eval_data=None,
          output_dir=CONFIG_OR_NONE, callbacks: Iterable[Callback] | None = None, config=None,
          **fields: Any) -> TrainResult:
    """Train `model` on `data` with `stage` ("sft", "dpo", "kto", "rm" or "online"); returns a `TrainResult`.

    "rm" trains a reward model: `model` a causal LM path (a scalar head is added) or an
    AutoModelForSequenceClassification object with num_labels=1; see `preftune.score` to use it.

    model, ref_model: a transformers causal LM, a peft model, or a path / Hub id. A model object is trained
        in place (as in TRL): it is moved to the run's device, cast to its dtype (a peft model keeps its
        dtypes), and its weights change; `result.model` is that same object. A reference object is frozen in
        place. With ref_model=None the reference is what `preftune dpo` uses: a frozen copy of the starting
        model, made once before training, or the model with its adapters off under LoRA or when `model` is a
        peft model (pass ref_model then if its adapters already hold training you want to keep in the
        reference).
    tokenizer: an object or a path; required when `model` is an object, else the model's own by default.
    data, eval_data: a list of dicts in any layout `preftune data check` knows, a `datasets.Dataset` (or a
        `DatasetDict`, read at `split`), or a path / Hub id. Messages name in-memory records "data record 12".
    output_dir: None trains in memory and writes nothing (checkpoints, resuming and metric sinks are refused);
        a path writes the same run folder as the command line. Left out: the config's, else None.
    callbacks: functions called with a copy of every metrics row (training and eval) as it is logged; one that
        returns "stop" ends the run after that step (with a folder, a checkpoint is written, as on SIGTERM).
    config: a `TrainConfig`, a dict of its fields, or a YAML file; keyword `fields` (any `TrainConfig` field
        by name: beta=0.1, max_steps=100, lr=5e-7, lora_r=16, ...) override it. An argument above left out
        (model, data, ref_model, tokenizer, eval_data, output_dir) keeps the path the config gives it.
    quiet: True unless passed as quiet=False (or set in a dict / YAML config): no progress, no output.

    stage "online" runs `preftune online` (see `online.api.train_online`): `data` holds prompts, and a `judge`
    field names the judge (or is a function).

    Raises `preftune.PreftuneError` subclasses (`ConfigError`, `DataError`, `ModelError`, ...).
    """
    if stage not in (*STAGES, "online"):
        raise ConfigError(f"stage: {stage!r} is not one of {', '.join((*STAGES, 'online'))}")
    callbacks = _checked_callbacks(callbacks)
    if stage == "online":
        from .online.api import train_online

        output_dir = None if output_dir is CONFIG_OR_NONE else output_dir  # online needs a folder: the config's
        out = train_online(model=model, data=data, tokenizer=tokenizer, ref_model=ref_model, eval_data=eval_data,
                           output_dir=output_dir, callbacks=callbacks, config=config, **fields)
        if out.model is not None:  # a plain model, as `train` hands back for the other stages
            release(out.model)
        metrics, step = out.metrics, None if out.stopped_at is None else out.stopped_at[1]
        if out.stopped_at is not None:
            metrics.update(stopped_at_round=out.stopped_at[0], stopped_at_step=step)
        return TrainResult(out.model, out.tokenizer, metrics, out.history, out.output_dir, step)
    values = _config_values(config, stage)
    values.update(fields)
    inputs = RunInputs()
    for name, given in (("model", model), ("data", data)):
        if given is None and not values.get(name):
            raise ConfigError(f"{name}: required; pass {name}=..., or give it in the config")
    if model is not None:
        values["model"] = _model_arg(model, "model", inputs)
    # An argument left out keeps what the config says (a path in a YAML file), as `preftune dpo --config` does.
    if ref_model is not None:
        values["ref_model"] = _model_arg(ref_model, "ref_model", inputs)
    if tokenizer is not None or not values.get("tokenizer"):
        values["tokenizer"] = _tokenizer_arg(tokenizer, inputs)
    if data is not None:
        values["data"] = _data_arg(data, "data", inputs)
    if eval_data is not None:
        values["eval_data"] = _data_arg(eval_data, "eval_data", inputs)
    if output_dir is not CONFIG_OR_NONE:
        if output_dir is not None and not is_path(output_dir):
            raise ConfigError(f"output_dir: expected a folder path, or None to train in memory; got "
                              f"{type(output_dir).__name__}")
        values["output_dir"] = "" if output_dir is None else os.fspath(output_dir)
    cfg = TrainConfig.from_dict(values, where="train()")
    _check_objects(cfg, inputs)
    return train_from_config(cfg, inputs=inputs, callbacks=callbacks, command=_command(cfg, inputs))


def train_from_config(cfg: TrainConfig, *, inputs: RunInputs | None = None,
                      callbacks: Iterable[Callback] | None = None, command: str | None = None,
                      resume_hint: str | None = None, load_finished: bool = True) -> TrainResult:
    """`train` for a ready `TrainConfig` (what `preftune sft|dpo` calls). An empty `cfg.output_dir` trains in
    memory. `command`: the command line recorded in the model card; `resume_hint`: what to print after
    "Resume with:" when a run with a folder is stopped (None prints nothing). `load_finished`: when `resume`
    finds the run already finished, load its saved model and tokenizer into the result (else they are None)."""
    in_memory = not cfg.output_dir
    if in_memory:
        _refuse_in_memory(cfg)
    given = inputs.model if inputs is not None else None
    was_training = given is not None and given.training
    try:
        outcome = execute(cfg, command=command or _command(cfg, inputs), inputs=inputs,
                          callbacks=list(callbacks or ()), in_memory=in_memory, resume_hint=resume_hint)
    except BaseException:
        if given is not None:  # in the mode it came in (a finished run hands it back in eval mode)
            given.train(was_training)
        raise
    finally:  # the caller's model goes on as a plain model (the KV cache back on, no fused norms, ...)
        if given is not None:
            release(given)
    out_dir = None if in_memory else Path(cfg.output_dir)
    if outcome.setup is not None:
        model, tokenizer = outcome.setup.policy, outcome.setup.tokenizer
        # With a folder the file is the whole record (a resumed run's earlier steps included).
        history = outcome.history if in_memory else _read_history(out_dir)
    else:  # resume found the run finished: hand back what it saved
        model, tokenizer = _load_finished(cfg) if load_finished else (None, None)
        history = _read_history(out_dir)
        stats = out_dir / DATA_STATS
        outcome.data_stats = json.loads(stats.read_text()) if stats.is_file() else {}
    if model is not None:
        if model is not given:  # a model loaded from a path, or the peft wrapper lora_r put on the given one
            release(model)
        model.eval()
    metrics = dict(outcome.final)
    if outcome.stopped_at is not None:
        metrics["stopped_at_step"] = outcome.stopped_at
    return TrainResult(model, tokenizer, metrics, history, out_dir, outcome.stopped_at, outcome.data_stats)


def _check_reading(*, batch_size: int, max_length: int, limit: int | None, device: str, dtype: str,
                   beta: float = 1.0, max_prompt_length: int | None = None) -> None:
    """The numbers and names `evaluate` and `score` take, checked before any model or data is read."""
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be at least 1, got {batch_size}")
    if max_length < 2:
        raise ConfigError(f"max_length: must be at least 2 (a prompt token and an answer token), got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ConfigError(f"max_prompt_length: must be at least 1 (or left out), got {max_prompt_length}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit: must be at least 1 (or left out for every pair), got {limit}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ConfigError(f"beta: must be a positive number, got {beta}")
    pick_dtype(dtype, pick_device(device))


def evaluate(*, model, data, tokenizer=None, ref_model=None, beta: float | None = None, batch_size: int = 8,
             max_length: int = 1024, max_prompt_length: int | None = None, data_format: str | None = None,
             split: str = "train", limit: int | None = None, device: str = "auto", dtype: str = "auto",
             trust_remote_code: bool = False) -> EvalReport:
    """Preference metrics of `model` (against `ref_model`, if given) on the pairs in `data`: `preftune eval`.

    model, ref_model: objects (evaluated where they are, in their dtype, and left as they were) or paths /
        Hub ids (loaded on `device` in `dtype`, as `preftune eval` loads them). tokenizer: required when
        `model` is an object. data: as for `train`. beta: None takes the run's when `model` is the folder of a
        preftune DPO or KTO run (its config.yaml), else 0.1; the summary says which. Rewards are
        beta * (log pi - log pi_ref), or beta * log pi
        without a reference. Returns an `EvalReport`: `.summary` is what `preftune eval` prints, `.rows` what
        it writes with --output.
    """
    beta = _run_beta(model) if beta is None else beta
    _check_reading(batch_size=batch_size, max_length=max_length, limit=limit, device=device, dtype=dtype, beta=beta,
                   max_prompt_length=max_prompt_length)
    if not is_path(model):
        check_model_object(model, "model")
        if tokenizer is None:
            raise ConfigError("tokenizer: required when model is an object (pass the tokenizer it was trained "
                              "with)")
    tok = (load_tokenizer(os.fspath(model), trust_remote_code=trust_remote_code) if tokenizer is None
           else given_tokenizer(tokenizer, trust_remote_code=trust_remote_code))
    if ref_model is not None and is_path(ref_model):  # a mistyped reference fails now, not after the policy's pass
        check_source(os.fspath(ref_model), "model", "--ref-model")
    source = as_source(data, "data")
    pairs, _ = data_load.load_pairs(source, data_format=data_format, split=split, skip_bad_records=None)
    if limit:
        pairs = pairs[:limit]
    items, stats = tokenize_all(tok, pairs, max_length=max_length, max_prompt_length=max_prompt_length)
    if not items:
        raise PreftuneError(f"{source}: no pair fits in --max-length {max_length}")

    def table(which, what: str):
        if is_path(which):
            run_device = pick_device(device)
            loaded = load_model(os.fspath(which), device=run_device, dtype=pick_dtype(dtype, run_device),
                                trust_remote_code=trust_remote_code, flag="--" + what.replace("_", "-"))
            freeze(loaded)
            require_items_fit(loaded, items, f"--{what.replace('_', '-')} {which}")
            out = logps_table(loaded, items, pad_id=tok.pad_token_id, device=run_device, batch_size=batch_size)
            del loaded
            return out
        check_model_object(which, what)
        require_items_fit(which, items, f"the {what} given")
        at = next(which.parameters()).device
        return logps_table(which, items, pad_id=tok.pad_token_id, device=at, batch_size=batch_size)

    policy = table(model, "model")
    ref = table(ref_model, "ref_model") if ref_model is not None else None
    summary = {"beta": beta, **preference_metrics(policy, ref, beta)}
    summary["dropped_pairs"] = stats.dropped
    summary["truncated_pairs"] = stats.truncated
    return EvalReport(summary, per_pair_rows(policy, ref, items))


def _run_beta(model) -> float:
    """The beta of the preftune DPO or KTO run whose folder `model` is (its config.yaml), else 0.1."""
    if not is_path(model) or not (Path(model) / "config.yaml").is_file():
        return 0.1
    try:
        saved = load_yaml_mapping(Path(model) / "config.yaml")
    except ConfigError:
        return 0.1
    beta = saved.get("beta")
    if saved.get("stage") in ("dpo", "kto") and isinstance(beta, (int, float)) and not isinstance(beta, bool):
        return float(beta)
    return 0.1


def score(model, data, *, tokenizer=None, batch_size: int = 8, max_length: int = 1024,
          max_prompt_length: int | None = None, data_format: str | None = None, split: str = "train",
          limit: int | None = None, device: str = "auto", dtype: str = "auto",
          trust_remote_code: bool = False) -> ScoreReport:
    """The reward of every answer in `data` under the reward model `model`: `preftune score`.

    model: a reward-model folder / Hub id (what `preftune rm` saves: a scalar `score` head; a plain causal LM is
        refused with `ModelError`), or an `AutoModelForSequenceClassification` object with num_labels=1 (then
        `tokenizer` is required; it is scored where it is). data: pairs in any layout `preftune data check` knows,
        or single answers (prompt/completion, with or without a label; messages), as a list of dicts, a
        `datasets.Dataset` or a path. Returns a `ScoreReport`: `.summary` (for pairs, `agreement`: the fraction
        of pairs whose chosen answer gets the higher reward, and `mean_margin`), `.rows` one dict an answer or pair.
    """
    from .reward import load_reward_model, set_pad_token

    _check_reading(batch_size=batch_size, max_length=max_length, limit=limit, device=device, dtype=dtype,
                   max_prompt_length=max_prompt_length)
    if is_path(model):
        run_device = pick_device(device)
        rm, tok = load_reward_model(os.fspath(model), device=run_device, dtype=pick_dtype(dtype, run_device),
                                    trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    else:
        rm = check_model_object(model, "model")
        name = type(rm).__name__
        if not name.endswith("ForSequenceClassification") or getattr(rm.config, "num_labels", None) != 1:
            raise ConfigError(f"model: a {name} is not a reward model (AutoModelForSequenceClassification with "
                              "num_labels=1)")
        if tokenizer is None:
            raise ConfigError("tokenizer: required when model is an object (pass the reward model's tokenizer)")
        tok = given_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        run_device = next(rm.parameters()).device
    borrowed = not is_path(model) and rm.config.pad_token_id is None
    if borrowed:  # the caller's model reads by the tokenizer's pad token for this call only
        before = rm.config.get_text_config().pad_token_id
        set_pad_token(rm, tok)
    try:
        return score_records(rm, tok, as_source(data, "data"), device=run_device, batch_size=batch_size,
                             max_length=max_length, max_prompt_length=max_prompt_length, data_format=data_format,
                             split=split, limit=limit)
    finally:
        if borrowed:
            rm.config.get_text_config().pad_token_id = before
            rm.config.pad_token_id = None


def load_pairs(source, data_format: str | None = None, *, split: str = "train", skip_bad_records: bool = False,
               min_score_gap: float | None = None) -> list[PreferencePair]:
    """The preference pairs in `source` as preftune reads them, for inspection.

    `source`: a path / Hub id, a list of dicts or a `datasets.Dataset`. Each `PreferencePair` holds `prompt`,
    `chosen`, `rejected` (text, or lists of {role, content} messages), `system` and `where` (the file line or
    record it came from). The format is detected from the keys unless `data_format` names one. Raises
    `DataError` for a record that cannot be read (or, with skip_bad_records, drops it).
    """
    pairs, _ = data_load.load_pairs(as_source(source, "data"), data_format=data_format, split=split,
                                    skip_bad_records=skip_bad_records, min_score_gap=min_score_gap)
    return pairs


# ------------------------------------------------------------------------------------------ arguments

def _config_values(config, stage: str) -> dict:
    """The config's fields as a dict, with the API's default of quiet=True where the config does not say."""
    if config is None:
        values: dict = {}
    elif isinstance(config, TrainConfig):
        values = config.to_dict()
        # A dataclass cannot say whether stage or quiet were set: the stage argument and the API's default apply,
        # unless the stage differs from the field's default (set, then, and not this run's).
        del values["quiet"]
        if values["stage"] == TrainConfig.stage:
            del values["stage"]
    elif isinstance(config, dict):
        values = dict(config)
    elif is_path(config):
        values = dict(load_yaml_mapping(config))
    else:
        raise ConfigError(f"config: expected a TrainConfig, a dict or a YAML path; got {type(config).__name__}")
    if values.get("stage", stage) != stage:
        raise ConfigError(f"config: is a {values['stage']} config; call train({values['stage']!r}, ...)")
    values["stage"] = stage
    values.setdefault("quiet", True)
    return values


def _model_arg(model, what: str, inputs: RunInputs) -> str:
    if is_path(model):
        return os.fspath(model)
    setattr(inputs, what, check_model_object(model, what))
    if what == "model" and carries_injected_adapters(model):
        # peft would put fresh adapters in place of the earlier run's, under the same name, in the same object.
        raise ConfigError("model: holds LoRA adapters that peft added in place (an earlier LoRA run, or "
                          "load_adapter); pass the peft model that wraps it (an earlier run's result .model) to go "
                          "on training them, or a plain model with them folded in: .merge_and_unload(), then "
                          ".requires_grad_(True) for full training")
    return placeholder(model)


def _checked_callbacks(callbacks) -> list | None:
    """`callbacks` as a list of functions (read once: it may be a generator), or a `ConfigError`."""
    if callbacks is None:
        return None
    if callable(callbacks) or isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise ConfigError(f"callbacks: expected a list of functions, got {type(callbacks).__name__}")
    callbacks = list(callbacks)
    for fn in callbacks:
        if not callable(fn):
            raise ConfigError(f"callbacks: expected functions, got {type(fn).__name__}")
    return callbacks


def _tokenizer_arg(tokenizer, inputs: RunInputs) -> str | None:
    if tokenizer is None:
        if inputs.model is not None:
            raise ConfigError("tokenizer: required when model is an object (pass the tokenizer that goes with it)")
        return None
    if is_path(tokenizer):
        return os.fspath(tokenizer)
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise ConfigError(f"tokenizer: expected a transformers tokenizer, a folder or a Hub id; got "
                          f"{type(tokenizer).__name__}")
    inputs.tokenizer = tokenizer
    return placeholder(tokenizer)


def _data_arg(data, what: str, inputs: RunInputs) -> str:
    source = as_source(data, what)
    if isinstance(source, str):
        return source
    setattr(inputs, what, source)
    return source.label()


def _check_objects(cfg: TrainConfig, inputs: RunInputs) -> None:
    """Settings that need the model as a path, and a reference that is the policy, refused before anything
    loads."""
    splits = inputs.data.records if inputs.data is not None and isinstance(inputs.data.records, dict) else None
    if splits is not None and inputs.eval_data is not None and inputs.eval_data.records is splits:
        raise ConfigError(f"eval_data: the same DatasetDict as data, read at the same split ({cfg.split!r}), so "
                          f"every eval pair would be a training pair; pass its held-out split "
                          f"(eval_data=dataset['test']), or eval_split=0.1 to hold out a share of data")
    if inputs.model is not None and inputs.ref_model is inputs.model:
        raise ConfigError("ref_model: the same object as model, so the reference would train with it; pass "
                          "ref_model=None (a frozen copy of the starting model), or a second copy of it")
    if inputs.model is not None and is_peft_model(inputs.model) and cfg.lora_r:
        raise ConfigError("lora_r: the model is already a peft model; its adapters train as they are (drop "
                          "lora_r), or pass the base model to add new ones")
    if (inputs.model is not None and not cfg.lora_r and not is_peft_model(inputs.model)
            and not any(p.requires_grad for p in inputs.model.parameters())):
        raise ConfigError("model: none of its weights requires a gradient (frozen, as peft's merge_and_unload "
                          "leaves them); call model.requires_grad_(True) to train them all, or pass lora_r for new "
                          "adapters")
    if inputs.model is not None and cfg.merge:
        # write_merged folds the saved adapter into the base read again from the files the adapter names; an
        # object may have none (built in code) or differ from them (trained in memory before).
        raise ConfigError("merge: rebuilds the merged model from the base model's files, and a model object need "
                          "not match any; drop merge and save result.model.merge_and_unload() yourself")
    if inputs.model is not None and cfg.load_in_4bit:
        raise ConfigError("load_in_4bit: loads the model from a path in 4 bits; pass the model as a path")
    reference_is_object = inputs.ref_model is not None or (not cfg.ref_model and inputs.model is not None)
    if cfg.precompute_ref and reference_is_object:
        raise ConfigError("precompute_ref: the on-disk cache is keyed by the reference's path; pass ref_model as "
                          "a path, or drop precompute_ref")


def _refuse_in_memory(cfg: TrainConfig) -> None:
    for name in ("save_every", "resume", "merge", "report_to"):
        if getattr(cfg, name):
            raise ConfigError(f"{name}: needs a run folder; pass output_dir=..., or drop {name}")


def _command(cfg: TrainConfig, inputs: RunInputs | None) -> str:
    """What the model card shows under "Reproduce"."""
    given = [name for name in _ARGUMENTS if inputs is not None and getattr(inputs, name, None) is not None]
    if given:
        return f"# trained from Python with {', '.join(given)} given as objects; config.yaml holds the settings"
    return f"preftune {cfg.stage} --config {Path(cfg.output_dir) / 'config.yaml'}"


def _load_finished(cfg: TrainConfig):
    device = pick_device(cfg.device)
    if cfg.stage == "rm":
        from .reward import load_reward_model

        return load_reward_model(cfg.output_dir, device=device, dtype=pick_dtype(cfg.dtype, device),
                                 trust_remote_code=cfg.trust_remote_code)
    model = load_model(cfg.output_dir, device=device, dtype=pick_dtype(cfg.dtype, device),
                       trust_remote_code=cfg.trust_remote_code)
    return model, load_tokenizer(cfg.output_dir, trust_remote_code=cfg.trust_remote_code)


def _read_history(out_dir: Path) -> list[dict]:
    """Every row of RUN/metrics.jsonl, in order (a last line cut short by a kill is left out)."""
    rows = []
    for line in (out_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
