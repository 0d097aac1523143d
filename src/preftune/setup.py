"""Everything a run builds before its first step: tokenizer, data, policy, reference strategy."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from . import lora
from .config import TrainConfig
from .data.batching import collate
from .data.load import load_pairs, load_sft, split_eval
from .data.records import LoadReport
from .data.tokenize import TokenizeStats, tokenize_all
from .distributed import DistEnv
from .logprobs import AnswerLogpModule, sharded_logps_module
from .losses import needs_reference
from .models import freeze, load_model, load_tokenizer
from .reference import AdaptersOffReference, FrozenReference

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


def reference_table(reference, items, *, pad_id: int, device, batch_size: int) -> torch.Tensor:
    """[N, k] reference log-probs of tokenised items, in order, from any reference strategy."""
    rows = []
    for s in range(0, len(items), batch_size):
        batch = collate(items[s:s + batch_size], pad_id).to(device)
        rows.append(reference.logps(batch).float().cpu().view(batch.size, batch.k))
    return torch.cat(rows)


def build(cfg: TrainConfig, *, device, dtype, env: DistEnv) -> Setup:
    lora.check_request(cfg, device)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
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
    if cfg.fsdp and not sharded:
        log.warning("--fsdp shards only across several processes; start the run with torchrun --nproc-per-node N")
    # Under FSDP each rank loads on the CPU and keeps only its shard on its device.
    load_device = torch.device("cpu") if sharded else device
    policy = load_model(cfg.model, device=load_device, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                        quantization_config=lora.quantization_config(cfg, dtype))
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    if cfg.lora_r:
        policy = lora.add_adapters(policy, cfg)
    logp = AnswerLogpModule(policy, prefix_sharing=cfg.prefix_sharing, chunk_size=cfg.logits_chunk_size, env=env,
                            fsdp=cfg.fsdp)
    reference = None
    eval_table = None
    if uses_reference(cfg):
        if cfg.lora_r and not cfg.ref_model:
            # The base weights under the adapters are the starting model: no second copy.
            reference = AdaptersOffReference(logp.eval_model, prefix_sharing=cfg.prefix_sharing,
                                             chunk_size=cfg.logits_chunk_size)
        else:
            ref_model = load_model(cfg.ref_model or cfg.model, device=load_device, dtype=dtype,
                                   trust_remote_code=cfg.trust_remote_code)
            freeze(ref_model)
            if sharded:
                ref_model = sharded_logps_module(ref_model, prefix_sharing=cfg.prefix_sharing,
                                                 chunk_size=cfg.logits_chunk_size)
            reference = FrozenReference(ref_model, prefix_sharing=cfg.prefix_sharing, chunk_size=cfg.logits_chunk_size)
        # --precompute-ref hook: once the on-disk reference cache lands, build its table here with each rank
        # computing its slice of the dataset (distributed.shard over positions) and an all-gather giving every
        # rank the whole [N, 2] table; rank 0 writes the cache. A CachedReference then replaces `reference`.
        if eval_items:
            eval_table = reference_table(reference, eval_items, pad_id=tokenizer.pad_token_id, device=device,
                                         batch_size=cfg.batch_size)
    return Setup(tokenizer, policy, reference, train_items, eval_items, records, report, stats, eval_stats,
                 eval_table, logp_module=logp, dtype=dtype)
