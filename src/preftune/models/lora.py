"""LoRA through peft: adapters on a policy, 4-bit base weights (QLoRA), adapter folders and merged models.

With LoRA the reference is the policy with its adapters switched off (`training.reference.AdaptersOffReference`):
the frozen base weights exist once in memory and serve both. A run folder then holds only the adapter
(`adapter_config.json`, `adapter_model.safetensors`) and the tokenizer; `--merge` adds `merged/`, a full
model that plain `transformers` loads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import ConfigError, PreftuneError
from .load import load_adapter_model, quiet_peft, require_peft, save_model

MERGED = "merged"


def check_request(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse LoRA settings this machine cannot run, before any model is loaded."""
    if not cfg.lora_r:
        return
    require_peft()
    if cfg.load_in_4bit:
        if device.type != "cuda":
            raise ConfigError(f"load_in_4bit: 4-bit weights (bitsandbytes) need a CUDA GPU; this run is on "
                              f"{device.type}. Drop --load-in-4bit to train LoRA on full-precision weights")
        if cfg.fsdp:
            raise ConfigError("load_in_4bit: cannot be sharded with --fsdp; use one of them")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise PreftuneError("--load-in-4bit needs the bitsandbytes package: pip install preftune[qlora]") from None


def quantization_config(cfg: TrainConfig, compute_dtype: torch.dtype):
    """The 4-bit NF4 loading recipe of QLoRA (Dettmers et al. 2023), or None without --load-in-4bit."""
    if not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def target_modules(spec: str) -> str | list[str]:
    """`all-linear` (peft's name for every linear layer except the output projection) or a list of names."""
    spec = spec.strip()
    if spec == "all-linear":
        return spec
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("lora_targets: empty; give module names such as q_proj,v_proj, or all-linear")
    return names


def add_adapters(model, cfg: TrainConfig):
    """Wrap `model` in a peft model with fresh LoRA adapters; only the adapters require gradients."""
    peft = require_peft()
    if cfg.load_in_4bit:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora_cfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=target_modules(cfg.lora_targets), bias="none",
                               # A reward model's new score head trains whole beside the adapters (peft keeps it
                               # in modules_to_save for SEQ_CLS) and is saved with them.
                               task_type="SEQ_CLS" if cfg.stage == "rm" else "CAUSAL_LM")
    try:
        with quiet_peft():
            return peft.get_peft_model(model, lora_cfg)
    except ValueError as exc:
        raise ConfigError(f"lora_targets: {cfg.lora_targets!r} does not fit this model "
                          f"({str(exc).splitlines()[0]})") from None


def write_merged(run_dir: Path, tokenizer, *, dtype: torch.dtype, trust_remote_code: bool = False,
                 load=load_adapter_model) -> Path:
    """`run_dir/merged/`: base + adapter folded into ordinary weights, in `dtype`.

    Built from the saved adapter and a fresh full-precision base on the CPU, so a QLoRA run merges into
    unquantised weights and the trained model in memory is left as it was. `load(path, device=, dtype=,
    trust_remote_code=)` reads the adapter folder back (a reward model's has its own loader).
    """
    model = load(run_dir, device=torch.device("cpu"), dtype=dtype, trust_remote_code=trust_remote_code)
    merged = model.merge_and_unload()
    out, part = run_dir / MERGED, run_dir / f".{MERGED}.part"
    shutil.rmtree(part, ignore_errors=True)  # a merge cut short before
    save_model(merged, tokenizer, part)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(part, out)  # merged/ is whole or absent
    return out
