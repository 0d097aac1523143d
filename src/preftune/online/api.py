"""`preftune.train("online", ...)`: the Python face of `preftune online`."""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError, DataError


def train_online(*, model=None, data=None, tokenizer=None, ref_model=None, eval_data=None, output_dir=None, callbacks=None,
                 config=None, **fields: Any):
    """Online DPO from `model` (a folder or Hub id) on the prompts in `data` (a path or a list of prompt records
    / strings); `eval_data`: held-out prompts. `judge` (a field) is a spec string (`rule:...`, `python:...`,
    `reward-model:DIR`) or a function `(prompt, answers) -> list[float]`. `output_dir` is required: each round
    trains in a run folder of its own. `config`: a dict or YAML path of `preftune online` settings; `fields`
    override it. Returns `rounds.OnlineResult` (api.train hands it on as a `TrainResult`)."""
    from ..config import load_yaml_mapping
    from ..data.memory import is_path
    from .config import OnlineConfig
    from .rounds import run_online

    for name, value in (("tokenizer", tokenizer), ("ref_model", ref_model)):
        if value is not None:
            raise ConfigError(f"{name}: not an argument of online training (the model folder's tokenizer is used; "
                              f"the reference is the model, or each round's start with ref_update='round')")
    values = dict(load_yaml_mapping(config)) if is_path(config) else dict(config or {})
    values.pop("stage", None)
    values.setdefault("quiet", True)
    values.update(fields)
    model = values.get("model") if model is None else model  # left out: the config's
    if data is None and not values.get("prompts"):
        raise ConfigError("data: required; pass data=... (prompts), or give prompts in the config")
    if not model:
        raise ConfigError("model: required; pass model=..., or give it in the config")
    if not is_path(model):
        raise ConfigError("model: online training reloads each round's policy from its folder; pass the model as "
                          "a path (save_pretrained it first)")
    output_dir = values.get("output_dir") if output_dir is None else output_dir
    if not output_dir:
        raise ConfigError("output_dir: required for online training (each round keeps its pairs and checkpoints)")
    judge = values.get("judge")
    if callable(judge):
        values["judge"] = ""
    prompts = eval_prompts = None
    if data is not None and is_path(data):
        values["prompts"] = os.fspath(data)
    elif data is not None:
        prompts = _prompt_list(data, "data")
    if eval_data is not None and is_path(eval_data):
        values["eval_prompts"] = os.fspath(eval_data)
    elif eval_data is not None:
        eval_prompts = _prompt_list(eval_data, "eval_data")
    values.update(model=os.fspath(model), output_dir=os.fspath(output_dir))
    cfg = OnlineConfig.from_dict(values, where="train()")
    return run_online(cfg, judge=judge if callable(judge) else None, prompts=prompts, eval_prompts=eval_prompts,
                      callbacks=callbacks or ())


def _prompt_list(source, name: str) -> list:
    """In-memory prompts as a list: a list of prompts or prompt records, or a `datasets.Dataset` (iterating a
    dict, a DataFrame or a DatasetDict would give its keys as the prompts)."""
    from ..data.memory import as_source

    records = as_source(source, name).records
    if isinstance(records, dict):  # a DatasetDict: online prompts have no split to choose
        raise DataError(f"{name}: a DatasetDict with splits {', '.join(records)}; pass one split, e.g. "
                        f"{name}=dataset[{next(iter(records), 'train')!r}]")
    return list(records)
