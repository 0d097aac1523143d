"""Everything a run builds before its first step: tokenizer, data, policy, reference strategy."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import lora
from .config import TrainConfig
from .data.load import load_pairs, load_sft, split_eval
from .data.records import LoadReport
from .data.tokenize import TokenizeStats, tokenize_all
from .distributed import DistEnv
from .errors import ConfigError
from .evaluate import table_of
from .logprobs import AnswerLogpModule, set_compute_dtype, sharded_logps_module
from .losses import needs_reference
from .models import Precision, check_source, freeze, load_model, load_tokenizer
from .reference import AdaptersOffReference, CachedReference, FrozenReference

log = logging.getLogger(__name__)


@dataclass
class Setup:
    tokenizer: object
    policy: torch.nn.Module
    reference: object | None             # a strategy with .logps(batch), or None for SFT / reference-free losses
    train_items: list
    eval_items: list
    records: list                         # normalised records, for messages that name a record
    report: LoadReport
    stats: TokenizeStats
    eval_stats: TokenizeStats | None = None
    eval_reference_table: torch.Tensor | None = None  # [N_eval, 2] reference log-probs of the eval pairs
    notes: list[str] = field(default_factory=list)
    logp_module: AnswerLogpModule | None = None  # the policy's log-probs as the loop runs them (DDP / FSDP2)
    dtype: torch.dtype = torch.float32

    def where(self, item) -> str:
        return self.records[item.index].where or f"record {item.index + 1}"


def load_records(cfg: TrainConfig, source: str):
    if cfg.stage == "sft":
        return load_sft(source, split=cfg.split, skip_bad_records=cfg.skip_bad_records)
    return load_pairs(source, data_format=cfg.data_format, split=cfg.split, skip_bad_records=cfg.skip_bad_records,
                      min_score_gap=cfg.min_score_gap)


def uses_reference(cfg: TrainConfig) -> bool:
    return cfg.stage == "dpo" and needs_reference(cfg.loss)


def build(cfg: TrainConfig, *, device, precision: Precision, env: DistEnv) -> Setup:
    lora.check_request(cfg, device)
    check_source(cfg.model, "model", "--model")  # every model named, before minutes of data and weights loading
    if uses_reference(cfg) and cfg.ref_model:
        check_source(cfg.ref_model, "model", "--ref-model")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code,
                               flag="--tokenizer" if cfg.tokenizer else "--model")
    records, report = load_records(cfg, cfg.data)
    eval_records: list = []
    if cfg.eval_data:
        eval_records, _ = load_records(cfg, cfg.eval_data)
    elif cfg.eval_split:
        records, eval_records = split_eval(records, cfg.eval_split, cfg.seed)
    train_items, stats = tokenize_all(tokenizer, records, max_length=cfg.max_length,
                                      max_prompt_length=cfg.max_prompt_length)
    eval_items, eval_stats = tokenize_all(tokenizer, eval_records, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length) if eval_records else ([], None)
    sharded = cfg.fsdp and env.enabled
    if sharded and cfg.precompute_ref and uses_reference(cfg):
        raise ConfigError("--precompute-ref: not yet with --fsdp (each rank would need the whole reference); "
                          "precompute in a run without --fsdp (the cache is reused), or drop the flag")
    if cfg.fsdp and not sharded:
        log.warning("--fsdp shards only across several processes; start the run with torchrun --nproc-per-node N")
    # Under FSDP each rank loads on the CPU and keeps only its shard on its device.
    load_device = torch.device("cpu") if sharded else device
    reference = None
    eval_table = None
    if uses_reference(cfg) and cfg.precompute_ref:
        # Before the policy loads, so the reference and the policy never sit in memory together.
        reference, eval_table = _cached_reference(cfg, tokenizer, train_items, eval_items, device, precision, env)
    # Under LoRA the loaded weights stay frozen (the adapters are what trains).
    dtype = precision.frozen if cfg.lora_r else precision.trained
    policy = load_model(cfg.model, device=load_device, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                        quantization_config=lora.quantization_config(cfg, precision.compute or dtype))
    set_compute_dtype(policy, precision.compute)
    if cfg.gradient_checkpointing:
        enable = getattr(policy, "activation_checkpointing_enable", None)  # the newer name, transformers >= 5.x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    if cfg.lora_r:
        policy = lora.add_adapters(policy, cfg)
    if cfg.compile:
        # The decoder body only: the answer-only projection stays eager. Lengths vary per batch, hence dynamic.
        from .logprobs import body_of

        body_of(policy).compile(dynamic=True)
    logp = AnswerLogpModule(policy, prefix_sharing=cfg.prefix_sharing, chunk_size=cfg.logits_chunk_size,
                            trim_padding=cfg.trim_padding, env=env, fsdp=cfg.fsdp)
    if uses_reference(cfg) and not cfg.precompute_ref:
        if cfg.lora_r and not cfg.ref_model:
            # The base weights under the adapters are the starting model: no second copy.
            reference = AdaptersOffReference(logp.eval_model, prefix_sharing=cfg.prefix_sharing,
                                             chunk_size=cfg.logits_chunk_size, trim_padding=cfg.trim_padding)
        else:
            ref_model = _load_reference(cfg, load_device, precision)
            if sharded:
                ref_model = sharded_logps_module(ref_model, prefix_sharing=cfg.prefix_sharing,
                                                 chunk_size=cfg.logits_chunk_size)
            reference = FrozenReference(ref_model, prefix_sharing=cfg.prefix_sharing, chunk_size=cfg.logits_chunk_size,
                                        trim_padding=cfg.trim_padding)
        if eval_items:
            eval_table = table_of(reference.logps, eval_items, pad_id=tokenizer.pad_token_id, device=device,
                                         batch_size=cfg.batch_size)
    return Setup(tokenizer, policy, reference, train_items, eval_items, records, report, stats, eval_stats,
                 eval_table, logp_module=logp, dtype=dtype)


def _load_reference(cfg: TrainConfig, device, precision: Precision):
    model = load_model(cfg.ref_model or cfg.model, device=device, dtype=precision.frozen,
                       trust_remote_code=cfg.trust_remote_code, flag="--ref-model" if cfg.ref_model else "--model")
    set_compute_dtype(model, precision.compute)
    freeze(model)
    return model


def _cached_reference(cfg: TrainConfig, tokenizer, train_items, eval_items, device, precision: Precision,
                      env: DistEnv):
    """(CachedReference for training, [N_eval, 2] eval table or None), from the on-disk cache or computed once.

    Under torchrun each rank computes every world-th pair and a sum over ranks assembles the whole table."""
    from .distributed import all_reduce_sum, barrier
    from .reference_cache import CacheRequest, cached_tables, compute_table, default_cache_dir

    settings = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                "dtype": str(precision.frozen), "compute": str(precision.compute)}

    def compute(model, items):
        mine = items[env.rank::env.world_size]
        part = compute_table(model, mine, pad_id=tokenizer.pad_token_id, device=device, batch_size=cfg.batch_size,
                             prefix_sharing=cfg.prefix_sharing, chunk_size=cfg.logits_chunk_size)
        rows = max(it.index for it in items) + 1
        table, filled = torch.zeros(rows, part.shape[1], dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
        idx = [it.index for it in mine]
        table[idx], filled[idx] = part[idx].double(), 1.0
        table, filled = all_reduce_sum(table, env), all_reduce_sum(filled, env)
        return table.float().masked_fill(filled[:, None] == 0, float("nan"))

    tables, messages = cached_tables(
        [CacheRequest("train", train_items), CacheRequest("eval", eval_items)],
        reference=cfg.ref_model or cfg.model, settings=settings,
        cache_dir=Path(cfg.ref_cache_dir).expanduser() if cfg.ref_cache_dir else default_cache_dir(),
        load_model=lambda: _load_reference(cfg, device, precision), compute=compute, is_main=env.is_main,
        barrier=lambda: barrier(env))
    barrier(env)
    if env.is_main and not cfg.quiet:
        for line in messages:
            print(line, flush=True)
    eval_table = tables["eval"][[it.index for it in eval_items]] if eval_items else None
    return CachedReference(tables["train"]), eval_table
