"""Everything a run builds before its first step: tokenizer, data, policy, reference strategy."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import TrainConfig
from .data.load import load_pairs, load_sft, split_eval
from .data.records import LoadReport
from .data.tokenize import TokenizeStats, tokenize_all
from .distributed import DistEnv
from .evaluate import logps_table
from .losses import needs_reference
from .models import freeze, load_model, load_tokenizer
from .reference import FrozenReference


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

    def where(self, item) -> str:
        return self.records[item.index].where or f"record {item.index + 1}"


def load_records(cfg: TrainConfig, source: str):
    if cfg.stage == "sft":
        return load_sft(source, split=cfg.split, skip_bad_records=cfg.skip_bad_records)
    return load_pairs(source, data_format=cfg.data_format, split=cfg.split, skip_bad_records=cfg.skip_bad_records,
                      min_score_gap=cfg.min_score_gap)


def uses_reference(cfg: TrainConfig) -> bool:
    return cfg.stage == "dpo" and needs_reference(cfg.loss)


def build(cfg: TrainConfig, *, device, dtype, env: DistEnv) -> Setup:
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
    policy = load_model(cfg.model, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    reference = None
    eval_table = None
    if uses_reference(cfg):
        ref_model = load_model(cfg.ref_model or cfg.model, device=device, dtype=dtype,
                               trust_remote_code=cfg.trust_remote_code)
        freeze(ref_model)
        reference = FrozenReference(ref_model, prefix_sharing=cfg.prefix_sharing, chunk_size=cfg.logits_chunk_size)
        if eval_items:
            eval_table = logps_table(ref_model, eval_items, pad_id=tokenizer.pad_token_id, device=device,
                                     batch_size=cfg.batch_size, prefix_sharing=cfg.prefix_sharing,
                                     chunk_size=cfg.logits_chunk_size)
    return Setup(tokenizer, policy, reference, train_items, eval_items, records, report, stats, eval_stats,
                 eval_table)
