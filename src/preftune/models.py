"""Load Hugging Face causal LMs and tokenizers; choose device and dtype; save in Hugging Face format."""

from __future__ import annotations

import functools
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError
from .io import follow_umask

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """CUDA > MPS > CPU for `auto`; an explicit device that is not there is an error, not a silent fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is visible; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("--device mps: MPS is not available here; use --device auto or cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Precision:
    """Dtypes of a run. `trained`: weights the optimizer updates; `frozen`: weights it never touches (the
    reference, a LoRA base); `compute`: the autocast dtype of forwards, None to compute in the weights' dtype."""

    trained: torch.dtype
    frozen: torch.dtype
    compute: torch.dtype | None = None


def pick_precision(name: str, device: torch.device) -> Precision:
    """`auto` is `mixed` on GPUs with bf16 and float32 elsewhere (CPU bf16 matmuls are slow).

    `mixed` keeps trained weights and optimizer state in fp32 and computes in bf16: a DPO update at lr 5e-7 is
    far below a bf16 weight's spacing, so pure bf16 weights would drop most updates. Frozen weights are held in
    bf16, which halves the reference's memory. `bfloat16`/`float16`/`float32` hold every weight in that dtype.
    """
    if name == "auto":
        name = "mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name == "mixed":
        return Precision(torch.float32, torch.bfloat16, torch.bfloat16)
    return Precision(_DTYPES[name], _DTYPES[name])


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to load a model in for inference (eval, generate): the frozen dtype of `pick_precision`."""
    return pick_precision(name, device).frozen


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
            raise ModelError(f"{flag} {name_or_path}: no {markers[0]} in this folder; point to a Hugging Face "
                             f"{what} folder (the one save_pretrained wrote)")
        return
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith("."):
        raise ModelError(f"{flag} {name_or_path}: folder not found")
    _check_hub(name_or_path, flag, _MARKERS[what])


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


def _quiet_transformers() -> None:
    """Our own progress display is enough; transformers' per-load bars would interleave with it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, flag: str = "--model"):
    """The tokenizer of a folder or Hub id; `flag` is the option that named it, for messages."""
    from transformers import AutoTokenizer

    _quiet_transformers()

    check_source(name_or_path, "tokenizer", flag)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{flag} {name_or_path}: its tokenizer cannot be loaded ({str(exc).splitlines()[0]})"
                         ) from None
    if tok.pad_token_id is None:
        # Padding positions are masked everywhere, so any id works; EOS is the customary stand-in.
        if tok.eos_token is None:
            raise ModelError(f"{flag} {name_or_path}: its tokenizer has neither a pad nor an EOS token; add one")
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


def load_model(name_or_path: str, *, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
               quantization_config=None, flag: str = "--model"):
    """A causal LM, on `device` in `dtype`. Remote code runs only with `trust_remote_code`.

    Weights come from safetensors when the folder has them. A folder with only pickled weights
    (`pytorch_model.bin`) still loads, but through torch's restricted unpickler (weights_only=True), which accepts
    tensors and plain containers and refuses anything that could run code; such a file is reported, not loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_transformers()
    check_source(name_or_path, "model", flag)
    from .lora import is_adapter_folder, load_adapter_model

    if is_adapter_folder(name_or_path):  # a LoRA run folder: its base model plus the adapter
        return load_adapter_model(name_or_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as exc:
        raise _load_error(name_or_path, exc) from None
    _check_causal(config, name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
            quantization_config=quantization_config, use_safetensors=None, weights_only=True)
    except (ValueError, OSError) as exc:
        raise _load_error(name_or_path, exc, config) from None
    except pickle.UnpicklingError:
        raise ModelError(f"model {name_or_path}: refused; its pickled weights file holds Python objects other than "
                         f"tensors, and unpickling them could run arbitrary code. Use a safetensors copy of the "
                         f"model from a source you trust") from None
    if quantization_config is None:
        model.to(device)
    return model


def freeze(model) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def save_model(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> None:
    """Hugging Face format (safetensors + config + tokenizer): loadable by `AutoModelForCausalLM.from_pretrained`.

    `state_dict`: the weights to write instead of the model's own (the gathered copy of a sharded model).
    A peft model writes only its adapter.
    """
    _quiet_transformers()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    follow_umask(out_dir)  # safetensors writes weights 0600


def tiny_llama(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int | None = None,
               max_positions: int = 512, bos_id: int | None = None, eos_id: int | None = None,
               pad_id: int | None = None, seed: int = 0):
    """A small random-weight Llama for the demo and tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, bos_token_id=bos_id, eos_token_id=eos_id,
                      pad_token_id=pad_id, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)
