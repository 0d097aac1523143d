"""Load Hugging Face causal LMs (a LoRA adapter folder with its base model) and tokenizers; save in Hugging Face
format."""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import re
import threading
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import ModelError, PreftuneError
from ..io import absolute_if_local, follow_umask

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
_MARKERS = {"model": ("config.json", "adapter_config.json"), "tokenizer": ("tokenizer_config.json", "tokenizer.json")}
# owner/name or a bare legacy name such as "gpt2": the shape of a Hugging Face Hub model id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(name: str) -> bool:
    """True for a name shaped like a Hub id that is not a path on this machine."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def check_source(name_or_path: str, what: str = "model", flag: str = "--model") -> None:
    """Fail in seconds, naming `flag`, unless `name_or_path` is a Hugging Face folder here or a Hub repository
    that can be had (cached, or the Hub answers that it exists). Without this, a mistyped folder name is taken
    for a Hub id and transformers retries the network for most of a minute before a message about something
    else. `what`: "model" or "tokenizer", the kind of folder expected."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        markers = _MARKERS[what]
        if not path.is_dir():
            raise ModelError(f"{flag} {name_or_path}: is a file; point to the folder save_pretrained wrote")
        if not any((path / m).is_file() for m in markers):
            if (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file():
                raise ModelError(f"{flag} {name_or_path}: a run folder without its final model (the run has not "
                                 f"finished); finish it with `preftune {_run_stage(path)} --config "
                                 f"{path / 'config.yaml'} --resume`, or point to a finished run")
            raise ModelError(f"{flag} {name_or_path}: no {markers[0]} in this folder; point to a Hugging Face "
                             f"{what} folder (the one save_pretrained wrote)")
        return
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith("."):
        raise ModelError(f"{flag} {name_or_path}: folder not found")
    _check_hub(name_or_path, flag, _MARKERS[what])


def _run_stage(run: Path) -> str:
    """The stage a run folder's config.yaml names (its command), or a placeholder when it cannot be read."""
    import yaml

    try:
        stage = yaml.safe_load((run / "config.yaml").read_text()).get("stage")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        stage = None
    return stage if isinstance(stage, str) and stage.isidentifier() else "<stage>"


@functools.lru_cache(maxsize=None)  # the tokenizer and the model of one id ask once
def _check_hub(repo: str, flag: str, markers: tuple[str, ...]) -> None:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    if any(isinstance(try_to_load_from_cache(repo, m), str) for m in markers):
        return  # in the local Hub cache: loads without the network
    head = f"{flag} {repo}: no local folder of that name"
    if constants.is_offline_mode():
        raise ModelError(f"{head}, and the Hub is not consulted (HF_HUB_OFFLINE is set) and has no cached copy")
    try:  # one request, no retries: a machine without network answers at once
        HfApi().model_info(repo, timeout=10)
    except GatedRepoError:
        raise ModelError(f"{flag} {repo}: a gated Hub repository; accept its terms on huggingface.co and log in "
                         f"(hf auth login)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{head}, and no Hub repository of that name either (if it is private, log in with "
                         f"hf auth login)") from None
    except HFValidationError:
        raise ModelError(f"{head}, and it is not a valid Hub id either") from None
    except Exception as exc:  # connection refused, DNS, timeouts, proxies: whatever the HTTP stack raises
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"{head}, and the Hub could not be reached ({first})") from None


_QUIET_LOCK = threading.Lock()
_QUIET: dict = {"depth": 0, "found": None}


@contextmanager
def transformers_quiet():
    """transformers' progress bars and messages below errors off inside (a decorator too): our own progress
    display is enough, and theirs would interleave with it. The settings found are back on exit, so a library
    call leaves the caller's logging as it was (the command line turns the messages off for its whole process).
    """
    from transformers.utils import logging as hf_logging

    with _QUIET_LOCK:  # one window for overlapping calls (threads): the settings found by the first come back last
        if _QUIET["depth"] == 0:
            _QUIET["found"] = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        _QUIET["depth"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET["depth"] -= 1
            if _QUIET["depth"] == 0:
                verbosity, bars = _QUIET["found"]
                hf_logging.set_verbosity(verbosity)
                if bars:
                    hf_logging.enable_progress_bar()


@transformers_quiet()
def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, flag: str = "--model"):
    """The tokenizer of a folder or Hub id; `flag` is the option that named it, for messages."""
    from transformers import AutoTokenizer

    check_source(name_or_path, "tokenizer", flag)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:  # the last: a config.json that is not an object
        raise ModelError(f"{flag} {name_or_path}: its tokenizer cannot be loaded ({str(exc).splitlines()[0]})"
                         ) from None
    return ensure_pad_token(tok, f"{flag} {name_or_path}:")


def given_tokenizer(tokenizer, *, trust_remote_code: bool = False):
    """A tokenizer as the API takes one: a folder or Hub id (loaded; named "--tokenizer" in messages, as the other
    inputs are named by their flags), or a tokenizer object (given a pad token if it has none)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(os.fspath(tokenizer), trust_remote_code=trust_remote_code, flag="--tokenizer")
    return ensure_pad_token(tokenizer, "the tokenizer given:")


def ensure_pad_token(tok, name: str):
    """`tok`, given a pad token if it has none (set in place); `name` starts the message if it has neither."""
    if tok.pad_token_id is None:
        # Padding positions are masked everywhere, so any id works; EOS is the customary stand-in.
        if tok.eos_token is None:
            raise ModelError(f"{name} its tokenizer has neither a pad nor an EOS token; add one")
        tok.pad_token = tok.eos_token
    return tok


def _check_causal(config, name_or_path: str) -> None:
    """Reject models saved as something else (an encoder, a classifier): AutoModelForCausalLM would happily
    bolt a fresh, untrained LM head onto some of them."""
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ModelError(f"model {name_or_path}: a {archs[0]} is not a causal language model; preftune trains "
                         f"decoder-only LMs (AutoModelForCausalLM)")


def _load_error(name_or_path: str, exc: Exception, config=None) -> ModelError:
    """One line for what transformers raised while reading a model's config (config=None) or its weights."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, ValueError):
        if "trust_remote_code" in msg or "custom code" in msg:
            return ModelError(f"model {name_or_path}: needs its own code to load; pass --trust-remote-code if you "
                              f"trust it")
        if config is not None and ("Unrecognized configuration class" in msg or "AutoModelForCausalLM" in msg):
            return ModelError(f"model {name_or_path}: a {type(config).__name__} is not a causal language model; "
                              f"preftune trains decoder-only LMs (AutoModelForCausalLM)")
        if config is None:
            return ModelError(f"model {name_or_path}: cannot read its config ({msg})")
    return ModelError(f"model {name_or_path}: cannot be loaded ({msg})")


@transformers_quiet()
def load_model(name_or_path: str, *, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
               quantization_config=None, flag: str = "--model"):
    """A causal LM, on `device` in `dtype`. Remote code runs only with `trust_remote_code`.

    Weights come from safetensors when the folder has them. A folder with only pickled weights
    (`pytorch_model.bin`) still loads, but through torch's restricted unpickler (weights_only=True), which accepts
    tensors and plain containers and refuses anything that could run code; such a file is reported, not loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_source(name_or_path, "model", flag)
    if is_adapter_folder(name_or_path):  # a LoRA run folder: its base model plus the adapter
        return load_adapter_model(name_or_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    source = absolute_if_local(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, TypeError) as exc:  # the last: a config.json that is not an object
        raise _load_error(name_or_path, exc) from None
    _check_causal(config, name_or_path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
            quantization_config=quantization_config, use_safetensors=None, weights_only=True,
            output_loading_info=True)
    except (ValueError, OSError, SafetensorError) as exc:  # the last: a truncated or damaged weights file
        raise _load_error(name_or_path, exc, config) from None
    except RuntimeError as exc:
        if "mismatched" not in str(exc) and "size mismatch" not in str(exc):
            raise
        raise ModelError(f"model {name_or_path}: its weights do not have the shapes its config.json gives (the "
                         f"config was edited, or belongs to another model); use the config the weights were saved "
                         f"with") from None
    except pickle.UnpicklingError:
        raise ModelError(f"model {name_or_path}: refused; its pickled weights file holds Python objects other than "
                         f"tensors, and unpickling them could run arbitrary code. Use a safetensors copy of the "
                         f"model from a source you trust") from None
    _require_all_weights(name_or_path, info)
    if quantization_config is None:
        model.to(device)
    return model


def _require_all_weights(name_or_path: str, info: dict) -> None:
    """Weights missing from the files would be trained from random values (transformers only warns, and preftune
    keeps it quiet): refused, naming them."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelError(f"model {name_or_path}: its weight files lack {shown}, which would start from random "
                         f"values; the files are incomplete, or belong to another architecture")


def require_peft():
    """The peft module, imported only when LoRA is asked for."""
    try:
        import peft
    except ImportError:
        raise PreftuneError("LoRA needs the peft package: pip install preftune[lora]") from None
    return peft


@contextmanager
def quiet_peft():
    """peft reads a transformers property that is being renamed; its warning says nothing to our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def is_adapter_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


@transformers_quiet()
def load_adapter_model(path: str | Path, *, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """Base model named in `adapter_config.json`, with the saved adapter on top (a peft model)."""
    peft = require_peft()
    path = Path(path)
    try:
        base_name = json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError):
        raise ModelError(f"model {path}: {ADAPTER_CONFIG} does not name its base model "
                         f"(base_model_name_or_path)") from None
    base = load_adapter_base(path, base_name, load_model, device=device, dtype=dtype,
                             trust_remote_code=trust_remote_code)
    with quiet_peft():
        return peft.PeftModel.from_pretrained(base, str(path)).to(device)


def load_adapter_base(path: Path, base_name: str, load, **kwargs):
    """`load(base_name, **kwargs)` for the base model an adapter folder names; a relative name that is not found
    gets a word on where relative names are read from (peft writes the path its base was loaded by)."""
    if not isinstance(base_name, str) or not base_name:
        # peft writes the model object's name_or_path: none for a model built in code rather than loaded
        raise ModelError(f"{path}: {ADAPTER_CONFIG} names no base model (the adapter was trained on a model object "
                         f"that was not loaded from a folder); write the base's folder into base_model_name_or_path, "
                         f"or load it onto its base with peft.PeftModel.from_pretrained(base, path)")
    try:
        return load(base_name, flag=f"{path / ADAPTER_CONFIG}: base_model_name_or_path", **kwargs)
    except ModelError as exc:
        if Path(base_name).expanduser().is_absolute() or Path(base_name).expanduser().exists():
            raise
        raise ModelError(f"{exc}. If it names a local folder: a relative base path is read from the current "
                         f"folder, so run from the folder the adapter was trained in, or write the base's "
                         f"absolute path there") from None


# Mixtral's and MiniMax's `jitter_noise`, PhiMoE's `input_jitter_noise`: the router's input times uniform noise
# while training. (PhiMoE's `router_jitter_noise` is a routing threshold in eval too: left as it is.)
_TRAINING_NOISE = ("jitter_noise", "input_jitter_noise")


def disable_dropout(model) -> None:
    """Dropout off in every layer: dropout modules, and the rates modules keep as plain floats and pass to
    `functional.dropout` themselves (attention dropout in most families; OPT's `dropout`, `activation_dropout`
    and `layerdrop`, which skips whole layers; GPT-J's `attn_pdrop`, ...): every float attribute named for
    dropping, and the training-only noise of mixture-of-experts routers (`_TRAINING_NOISE`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():  # and the noise routers multiply their input by in training
            if ("drop" in name or name in _TRAINING_NOISE) and isinstance(value, float):
                setattr(module, name, 0.0)


def freeze(model) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


# The KV-cache setting of each model config before training turned it off, by id (see `cache_off_for_training`).
_CACHE_BEFORE: dict[int, bool] = {}


def cache_off_for_training(model) -> None:
    """Training never reads a KV cache, so it is turned off in the model's config; `save_model` writes the
    setting the model came with, so that the saved model generates with its cache as the original does."""
    config = model.config
    if not hasattr(config, "use_cache"):  # a family without a KV cache setting (GPT-1, Llama 4, ...)
        return
    if id(config) not in _CACHE_BEFORE:
        _CACHE_BEFORE[id(config)] = config.use_cache
        weakref.finalize(config, _CACHE_BEFORE.pop, id(config), None)
    config.use_cache = False


def restore_cache_setting(model) -> None:
    """The model's KV-cache setting back to what it was before `cache_off_for_training` (after a run)."""
    config = getattr(model, "config", None)
    if config is not None and id(config) in _CACHE_BEFORE:
        config.use_cache = _CACHE_BEFORE.pop(id(config))


@contextmanager
def _cache_as_loaded(model):
    config = getattr(model, "config", None)
    if config is None or id(config) not in _CACHE_BEFORE:
        yield
        return
    now, config.use_cache = config.use_cache, _CACHE_BEFORE[id(config)]
    try:
        yield
    finally:
        config.use_cache = now


@transformers_quiet()
def save_model(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> None:
    """Hugging Face format (safetensors + config + tokenizer): loadable by `AutoModelForCausalLM.from_pretrained`.

    `state_dict`: the weights to write instead of the model's own (the gathered copy of a sharded model).
    A peft model writes only its adapter.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with _cache_as_loaded(model):
        model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    follow_umask(out_dir)  # safetensors writes weights 0600
