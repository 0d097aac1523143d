"""Reward models: load one, and score answers with it (what `preftune rm` trains, `preftune score` and a judge use).

A reward model is a causal LM with a scalar head: `AutoModelForSequenceClassification` with `num_labels=1`. The
reward of an answer is the head's output at the last token of `prompt + answer`, read by the model's own forward
(the rightmost token that is not the pad token), so the number is the one `from_pretrained(...)(ids).logits`
gives anywhere else, and the one TRL's RewardTrainer trains. Sequences are tokenised as everywhere in preftune
(data/encode.py): text answers end with EOS, chat answers with the template's end of turn.

For a judge: `load_reward_model(path)` then `score_texts(model, tokenizer, prompts, answers)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from .data.batching import PromptAnswerBatch, collate
from .data.records import Content, SFTExample
from .data.tokenize import tokenize_example
from .errors import ModelError, PreftuneError
from .io import absolute_if_local
from .logps.limits import limits_of, switch_calls
from .logps.parts import LMWrapper, attention_backends, compute_precision
from .models.load import (ADAPTER_CONFIG, check_source, given_tokenizer, is_adapter_folder, load_adapter_base,
                          load_tokenizer, quiet_peft, require_peft, transformers_quiet)

_HEAD_SUFFIX = "ForSequenceClassification"


def sequences(batch: PromptAnswerBatch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each [B*k, L]: row j is prompt j // k followed by answer j, right-padded.

    Built with gathers on the batch's device (no per-row copies, which on a GPU would be a launch each)."""
    p_host, a_host = batch.lengths()
    k = batch.k
    width = max(p_host[j // k] + a for j, a in enumerate(a_host))
    rows = torch.arange(len(a_host), device=batch.answer_ids.device) // k
    t = torch.arange(width, device=rows.device)[None, :]
    p = batch.prompt_lens[rows][:, None]
    end = p + batch.answer_lens[:, None]
    prompt_part = batch.prompt_ids[rows].gather(1, t.clamp(max=batch.prompt_ids.shape[1] - 1).expand(len(rows), -1))
    answer_part = batch.answer_ids.gather(1, (t - p).clamp(0, batch.answer_ids.shape[1] - 1))
    ids = torch.where(t < p, prompt_part, torch.where(t < end, answer_part, torch.full_like(answer_part, pad_id)))
    return ids, (t < end).long()


def batch_rewards(model, batch: PromptAnswerBatch) -> torch.Tensor:
    """[B*k] rewards of every answer in `batch` (pairs: chosen, rejected, chosen, ...), in float32.

    `model` is a sequence-classification model with one label whose config names the pad token. Each answer's
    reward is that of its own sequence alone: where the rope's factors follow the call's longest sequence
    (logps/limits.py), the sequences before and past the switch run in calls of their own."""
    pad_id = _pad_id(model)
    ids, mask = sequences(batch, pad_id)
    with compute_precision(model), attention_backends(ids.device):
        lengths, limits = mask.sum(dim=1), limits_of(model)
        if limits.rope_switch is None or not bool((lengths > limits.rope_switch).any()):
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0].float()
        calls = switch_calls(lengths, torch.ones_like(lengths, dtype=torch.bool), limits)
        parts = []
        for rows in calls:
            width = int(lengths[rows].max())
            parts.append(model(input_ids=ids[rows, :width], attention_mask=mask[rows, :width],
                               use_cache=False).logits[:, 0].float())
        order = torch.cat(calls)
        return torch.cat(parts)[torch.argsort(order)]


class RewardForward(LMWrapper):
    """`batch_rewards` as one module's forward, so DDP can wrap it."""

    def forward(self, batch: PromptAnswerBatch) -> torch.Tensor:
        return batch_rewards(self.model, batch)


def _pad_id(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if config.pad_token_id is None:
        raise ModelError("reward model: its config names no pad token (pad_token_id); the last token of a padded "
                         "answer cannot be found")
    return config.pad_token_id


@torch.no_grad()
def rewards_table(model, items, *, pad_id: int, device, batch_size: int) -> torch.Tensor:
    """[N, k] rewards of tokenised items in order (pairs: k=2, chosen then rejected; single answers: k=1), in
    eval mode for the duration. `pad_id` pads the token rows (the model's config must name the same id)."""
    was_training = model.training
    model.eval()
    try:
        rows = []
        for s in range(0, len(items), batch_size):
            batch = collate(items[s:s + batch_size], pad_id).to(device)
            rows.append(batch_rewards(model, batch).cpu().view(batch.size, batch.k))
        return torch.cat(rows) if rows else torch.zeros(0, 1)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------ loading

def _classification_class():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def set_pad_token(model, tokenizer) -> None:
    """The model reads the reward at the last token that is not the pad token: tell it which one that is."""
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


def training_pad_token(model, tokenizer) -> str | None:
    """Set the pad token a reward-model run reads by; a note to say when it is not the tokenizer's.

    A model that starts with a new head (a causal LM) takes the tokenizer's pad token, as TRL sets it. A reward
    model whose config names one keeps it: it was trained to read its reward at the last token that is not that
    one, and `preftune score` reads it there, so training on takes it too and the tokenizer pads with it (the
    saved folder then agrees with itself)."""
    archs = getattr(model.config, "architectures", None) or []
    named = _pad_id_or_none(model)
    if named is None or not any(a.endswith(_HEAD_SUFFIX) for a in archs):
        set_pad_token(model, tokenizer)
        return None
    if tokenizer.pad_token_id == named:
        return None
    before, token = tokenizer.pad_token, tokenizer.convert_ids_to_tokens(named)
    if token is None:
        raise ModelError(f"the reward model's config names pad token id {named}, which its tokenizer does not have "
                         f"({len(tokenizer)} tokens); set pad_token_id in its config.json to the tokenizer's pad id")
    tokenizer.pad_token = token
    return (f"the reward model's config names pad token id {named} ({tokenizer.pad_token!r}), the tokenizer "
            f"{before!r}: it reads its reward at the last token that is not {tokenizer.pad_token!r}, as it was "
            f"trained and as `preftune score` reads it, so the tokenizer pads with that one")


@transformers_quiet()
def start_reward_model(name_or_path: str, *, device, dtype, trust_remote_code: bool = False,
                       quantization_config=None, flag: str = "--model"):
    """A model to train as a reward model: a causal LM checkpoint (or a reward model) loaded as
    `AutoModelForSequenceClassification` with `num_labels=1`. A causal LM gets a new `score` head, initialised by
    transformers from the torch random state (seed it first, as TRL does); its LM head is left out."""
    from transformers import AutoConfig

    from .models.load import _load_error

    check_source(name_or_path, "model", flag)
    if is_adapter_folder(name_or_path):
        raise ModelError(f"{flag} {name_or_path}: a LoRA adapter folder; train a reward model from a full model "
                         "(merge the adapter first, e.g. a run's merged/ folder)")
    source = absolute_if_local(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as exc:
        raise _load_error(name_or_path, exc) from None
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", _HEAD_SUFFIX)) for a in archs):
        raise ModelError(f"{flag} {name_or_path}: a {archs[0]} is neither a causal LM nor a reward model")
    if any(a.endswith(_HEAD_SUFFIX) for a in archs) and getattr(config, "num_labels", 1) != 1:
        raise ModelError(f"{flag} {name_or_path}: a classifier with {config.num_labels} labels; a reward model has "
                         "one (num_labels=1)")
    config.num_labels = 1
    try:
        model = _classification_class().from_pretrained(
            source, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
            quantization_config=quantization_config, use_safetensors=None, weights_only=True)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{flag} {name_or_path}: cannot be loaded as a reward model "
                         f"(AutoModelForSequenceClassification: {str(exc).splitlines()[0]})") from None
    if quantization_config is None:
        model.to(device)
    return model


@transformers_quiet()
def load_reward_model(name_or_path: str | Path, *, device=None, dtype=torch.float32, trust_remote_code: bool = False,
                      flag: str = "--model", tokenizer=None):
    """(model, tokenizer) of a trained reward model folder (or Hub id), frozen, in eval mode, on `device`; the
    tokenizer is the folder's unless `tokenizer` (a folder, Hub id or tokenizer object) is given.

    The folder must hold a scalar head: a `...ForSequenceClassification` config with `num_labels=1` and its
    `score` weights, or a LoRA adapter of `preftune rm` (task SEQ_CLS, the head saved with it). A plain causal LM
    is refused (`ModelError`): scoring with a random head would give numbers that mean nothing."""
    name = str(name_or_path)
    device = torch.device("cpu") if device is None else torch.device(device)
    check_source(name, "model", flag)
    if is_adapter_folder(name):
        model = _load_adapter_reward_model(Path(name), device, dtype, trust_remote_code, flag)
    else:
        _require_head(name, trust_remote_code, flag)
        try:
            model = _classification_class().from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                            use_safetensors=None, weights_only=True)
        except (ValueError, OSError) as exc:
            raise ModelError(f"{flag} {name}: cannot be loaded ({str(exc).splitlines()[0]})") from None
        model.to(device)
    own = tokenizer is None
    tokenizer = (load_tokenizer(name, trust_remote_code=trust_remote_code, flag=flag) if own
                 else given_tokenizer(tokenizer, trust_remote_code=trust_remote_code))
    if is_adapter_folder(name):
        # An adapter's run read its rewards by its tokenizer's pad token (`training_pad_token`), which the run
        # folder keeps; the base's config, loaded again here, may name another, and so may a tokenizer given.
        set_pad_token(model, tokenizer if own else load_tokenizer(name, trust_remote_code=trust_remote_code,
                                                                   flag=flag))
    elif _pad_id_or_none(model) is None:
        set_pad_token(model, tokenizer)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _pad_id_or_none(model):
    try:
        return _pad_id(model)
    except ModelError:
        return None


def _require_head(name: str, trust_remote_code: bool, flag: str) -> None:
    """Refuse a folder without a trained scalar head: by its config's architectures, then by its weight names."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{flag} {name}: cannot read its config ({str(exc).splitlines()[0]})") from None
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith(_HEAD_SUFFIX) for a in archs):
        what = f"a {archs[0]}" if archs else "a model whose config names no architecture"
        raise ModelError(f"{flag} {name}: {what}, not a reward model (no scalar score head); train one with "
                         "`preftune rm`, or pass a folder whose config has a ...ForSequenceClassification")
    if getattr(config, "num_labels", None) != 1:
        raise ModelError(f"{flag} {name}: a classifier with {config.num_labels} labels; a reward model has one")
    names = _weight_names(Path(name))
    if names is not None and not any(n.split(".")[-2:-1] == ["score"] or n.startswith("score.") for n in names):
        raise ModelError(f"{flag} {name}: its weights hold no score head (no score.* tensor); it would be scored "
                         "with a random head")


def _weight_names(folder: Path) -> list[str] | None:
    """Tensor names of a local safetensors checkpoint (single file or sharded); None when not readable so."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(single), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{folder}: its model.safetensors cannot be read ({exc}); copy the model again") from None


def _load_adapter_reward_model(path: Path, device, dtype, trust_remote_code: bool, flag: str):
    peft = require_peft()
    try:
        adapter = json.loads((path / ADAPTER_CONFIG).read_text())
        base_name = adapter["base_model_name_or_path"]
    except (OSError, ValueError, KeyError):
        raise ModelError(f"{flag} {path}: {ADAPTER_CONFIG} does not name its base model") from None
    if adapter.get("task_type") != "SEQ_CLS":
        raise ModelError(f"{flag} {path}: a LoRA adapter for {adapter.get('task_type') or 'an unknown task'}, not "
                         "a reward model (task SEQ_CLS, as `preftune rm --lora-r` saves)")
    base = load_adapter_base(path, base_name, start_reward_model, device=device, dtype=dtype,
                             trust_remote_code=trust_remote_code)
    with quiet_peft():
        return peft.PeftModel.from_pretrained(base, str(path)).to(device)


# ------------------------------------------------------------------------------------------ scoring texts

def score_texts(model, tokenizer, prompts: Sequence[Content | None], answers: Sequence[Content], *,
                batch_size: int = 8, max_length: int = 1024, systems: Sequence[str | None] | None = None,
                device=None) -> list[float]:
    """The reward of each answer after its prompt, in order: the judge's call.

    prompts[i], answers[i]: text, or lists of {role, content} messages (then the chat template renders them);
    a text answer after a message-list prompt is the assistant's turn, rendered as `preftune rm` and `score`
    render chat pairs (a generated answer, decoded to text, scores as that conversation). A prompt may be None
    or "". Tokens past `max_length` are cut from the answer's end; a prompt that alone fills `max_length` raises
    `PreftuneError`. Runs on the model's device unless `device` says otherwise."""
    if len(prompts) != len(answers):
        raise PreftuneError(f"score_texts: {len(prompts)} prompts but {len(answers)} answers")
    answers = [[{"role": "assistant", "content": a}] if isinstance(p, list) and isinstance(a, str) else a
               for p, a in zip(prompts, answers)]
    systems = list(systems) if systems is not None else [None] * len(answers)
    examples = [SFTExample(answer, prompt or None, system, f"answer {i + 1}")
                for i, (prompt, answer, system) in enumerate(zip(prompts, answers, systems))]
    items = [tokenize_example(tokenizer, ex, max_length=max_length, index=i, scored_whole=True)
             for i, ex in enumerate(examples)]
    if None in items:
        dropped = items.count(None)
        raise PreftuneError(f"score_texts: {dropped} prompt(s) alone are longer than max_length {max_length}")
    at = device if device is not None else next(model.parameters()).device
    table = rewards_table(model, items, pad_id=tokenizer.pad_token_id, device=at, batch_size=batch_size)
    return table[:, 0].tolist()
