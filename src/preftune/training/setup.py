"""Everything a run builds before its first step: tokenizer, data, policy, reference strategy."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.load import UnpairedData, load_pairs, load_sft, load_unpaired, split_eval
from ..data.records import LoadReport
from ..data.token_cache import default_cache_dir as default_token_cache_dir, tokenize_cached
from ..data.tokenize import TokenizeStats, tokenize_all
from ..dist.env import DistEnv
from ..dist.logp_module import AnswerLogpModule, RewardModule, sharded_logps_module
from ..logps.router import router_aux_coef
from ..errors import ConfigError, DataError, ModelError
from ..metrics import table_of
from ..logps.limits import layout_note
from ..logps.parts import WIDTH_MULTIPLE, body_of, set_compute_dtype, sparse_embedding_grad
from ..inputs import RunInputs, frozen, is_peft_model, policy_in_place
from ..kto_loss import imbalance_advice
from ..losses import needs_reference
from ..models import lora
from ..models.fused import use_fused_norms, use_plain_norms
from ..models.fused_mlp import use_fused_mlps, use_plain_mlps
from ..models.narrow import (narrow_input_embedding, narrowable, require_items_fit, token_ids_of,
                             vocabulary_size)
from ..models.load import (cache_off_for_training, check_source, disable_dropout, ensure_pad_token, freeze,
                           is_adapter_folder, load_model, load_tokenizer, restore_cache_setting)
from ..models.precision import Precision, hold_frozen
from ..reward import start_reward_model, training_pad_token
from .reference import AdaptersOffReference, CachedReference, FrozenReference, StartAdaptersReference

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
    policy_logps: AnswerLogpModule | None = None  # the policy's log-probs as the loop runs them (DDP / FSDP2)
    dtype: torch.dtype = torch.float32
    router_aux_coef: float = 0.0  # weight of the policy's router load-balancing loss; 0 for none (logps/router.py)
    # Reward models: [N] margins of the training and held-out records by position, None where no record has one.
    margins: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def where(self, item) -> str:
        return self.records[item.index].where or f"record {item.index + 1}"


def load_records(cfg: TrainConfig, source: str):
    if cfg.stage == "sft":
        return load_sft(source, split=cfg.split, skip_bad_records=cfg.skip_bad_records)
    if cfg.stage == "kto":
        return load_unpaired(source, data_format=cfg.data_format, split=cfg.split,
                             skip_bad_records=cfg.skip_bad_records, paired_as_unpaired=cfg.paired_as_unpaired)
    try:
        return load_pairs(source, data_format=cfg.data_format, split=cfg.split,
                          skip_bad_records=cfg.skip_bad_records, min_score_gap=cfg.min_score_gap)
    except UnpairedData as exc:
        if cfg.stage != "rm":
            raise
        where = str(exc).split(": this is", 1)[0]
        raise DataError(f"{where}: unpaired feedback (one rated answer a record); a reward model trains on "
                        "chosen/rejected pairs. Score single answers with `preftune score`") from None


def margins_of(records) -> torch.Tensor | None:
    """[N] the records' margins (0 where a record has none), or None when no record has one."""
    if not any(getattr(r, "margin", None) is not None for r in records):
        return None
    return torch.tensor([r.margin or 0.0 for r in records], dtype=torch.float32)


def _tokenize(cfg: TrainConfig, tokenizer, records: list, source, part: str, env: DistEnv):
    """(items, stats) of `records`, tokenised in parallel and cached on disk as the config says (token_cache.py).
    `part` names which records of `source` these are: "all", or "train" / "eval" of --eval-split."""
    from ..dist.env import barrier

    settings = {"stage": cfg.stage, "data_format": cfg.data_format, "split": cfg.split, "part": part,
                "skip_bad_records": cfg.skip_bad_records, "min_score_gap": cfg.min_score_gap}
    if part != "all":
        settings.update(eval_split=cfg.eval_split, seed=cfg.seed)
    options = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
               "raw_text_prompts": cfg.raw_text_prompts, "last_turn_only": cfg.sft_last_turn_only}
    if cfg.stage == "kto":
        # Serial and not cached: each example's mismatched answer is drawn from its global batch, so a run on N
        # processes equals one process with N times the batch (TRL pairs within each device's batch).
        return tokenize_all(tokenizer, records, **options, kl_chunk=cfg.batch_size * env.world_size)
    cache_dir = None
    if cfg.token_cache:
        cache_dir = Path(cfg.token_cache_dir).expanduser() if cfg.token_cache_dir else default_token_cache_dir()
        if cache_dir is None and env.is_main and part != "eval":
            log.warning("no home directory and no XDG_CACHE_HOME: tokenised data is not cached; set "
                        "XDG_CACHE_HOME or --token-cache-dir to keep it")
    items, stats, message = tokenize_cached(tokenizer, records, source=source, settings=settings, options=options,
                                            procs=cfg.tokenize_procs, cache_dir=cache_dir, is_main=env.is_main,
                                            barrier=lambda: barrier(env))
    if message and env.is_main and not cfg.quiet:
        print(message, flush=True)
    return items, stats


def loaded_dtype(cfg: TrainConfig, precision) -> torch.dtype:
    """The dtype the policy is loaded in: a LoRA base is frozen, so it takes the frozen weights' dtype."""
    return precision.frozen if cfg.lora_r else precision.trained


def _check_one_step(cfg: TrainConfig, train_items: list, stats: TokenizeStats, env: DistEnv) -> None:
    """An epoch is whole optimizer steps (`batching.epoch_order`): the data must fill one."""
    step = cfg.batch_size * env.world_size * cfg.grad_accum
    if len(train_items) >= step:
        return
    what = f"one batch of {step}" if cfg.grad_accum == 1 else f"one step of {step} (--grad-accum {cfg.grad_accum})"
    if stats.dropped:  # the batch size is not what went wrong
        raise DataError(f"{cfg.data}: {stats.dropped} of {stats.total} examples dropped because the prompt alone is "
                        f"longer than --max-length {cfg.max_length} tokens, leaving {len(train_items)} (fewer than "
                        f"{what}); raise --max-length, or set --max-prompt-length to cut long prompts from the left")
    fix = "--batch-size" if cfg.grad_accum == 1 else "--batch-size or --grad-accum"
    raise DataError(f"{cfg.data}: {len(train_items)} usable examples, fewer than {what}; lower {fix} or add data")


def _ref_cache_dir(cfg: TrainConfig, default: Path | None) -> Path:
    if cfg.ref_cache_dir:
        folder = Path(cfg.ref_cache_dir).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--ref-cache-dir {cfg.ref_cache_dir}: is a file; give a folder (it is made when "
                              "missing)")
        return folder
    if (folder := default) is None:
        raise ConfigError("precompute_ref: no home directory and no XDG_CACHE_HOME to keep the reference's "
                          "log-probs in; pass --ref-cache-dir")
    return folder


def uses_reference(cfg: TrainConfig) -> bool:
    return cfg.stage == "kto" or (cfg.stage == "dpo" and needs_reference(cfg.loss))


def build(cfg: TrainConfig, *, device, precision: Precision, env: DistEnv, inputs: RunInputs | None = None) -> Setup:
    """`inputs`: objects used in place of the config's paths (a model, tokenizer, reference, records)."""
    inputs = inputs or RunInputs()
    lora.check_request(cfg, device)
    if inputs.model is None:  # every model named, before minutes of data and weights loading
        check_source(cfg.model, "model", "--model")
    brings_adapters = is_peft_model(inputs.model) if inputs.model is not None else is_adapter_folder(cfg.model)
    if cfg.merge and not cfg.lora_r and not brings_adapters:
        raise ConfigError("merge: only makes sense with LoRA; set --lora-r too (or start from an adapter folder)")
    if uses_reference(cfg) and cfg.ref_model and inputs.ref_model is None:
        check_source(cfg.ref_model, "model", "--ref-model")
    if inputs.tokenizer is not None:
        tokenizer = ensure_pad_token(inputs.tokenizer, "the tokenizer given:")
    else:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code,
                                   flag="--tokenizer" if cfg.tokenizer else "--model")
    if tokenizer.eos_token_id is None and env.is_main:
        log.warning("the tokenizer has no EOS token: text answers are trained without an end, so the model does "
                    "not learn where an answer stops; give it one (tokenizer.eos_token = ..., then save it)")
    source = cfg.data if inputs.data is None else inputs.data
    records, report = load_records(cfg, source)
    for note in (report.detection, report.unused_line()):
        if note and env.is_main:
            log.warning(note)
    if cfg.stage == "dpo" and margins_of(records) is not None and env.is_main:
        log.warning(f"{cfg.data}: the records' margin column is read by reward models (preftune rm) only; "
                    "DPO ignores it")
    eval_records: list = []
    eval_source, parts = None, ("all", "")
    if cfg.eval_data or inputs.eval_data is not None:
        eval_source = cfg.eval_data if inputs.eval_data is None else inputs.eval_data
        eval_records, eval_report = load_records(cfg, eval_source)
        for note in (eval_report.detection, eval_report.unused_line()):
            if note and env.is_main:
                log.warning(note)
        same = eval_source == source if isinstance(source, str) else getattr(eval_source, "records", None) is \
            getattr(source, "records", None)
        if same and env.is_main:
            log.warning(f"{eval_source}: the eval data is the training data, so eval metrics measure the fit to the "
                        "pairs trained on; hold out others with --eval-split")
    elif cfg.eval_split:
        records, eval_records = split_eval(records, cfg.eval_split, cfg.seed)
        eval_source, parts = source, ("train", "eval")
    elif cfg.eval_every:  # known here, where eval data given as an object counts too
        raise ConfigError("eval_every: there is no eval data to evaluate on; give --eval-data or --eval-split, or "
                          "drop --eval-every")
    train_items, stats = _tokenize(cfg, tokenizer, records, source, parts[0], env)
    eval_items, eval_stats = (_tokenize(cfg, tokenizer, eval_records, eval_source, parts[1], env) if eval_records
                              else ([], None))
    _check_one_step(cfg, train_items, stats, env)  # before any model is loaded, or one given is changed
    if eval_records and not eval_items:  # else the run would quietly evaluate nothing
        where = "--eval-data" if cfg.eval_data or inputs.eval_data is not None else "--eval-split"
        raise DataError(f"{eval_source} ({where}): all {eval_stats.total} eval examples dropped because the prompt "
                        f"alone is longer than --max-length {cfg.max_length} tokens; raise --max-length, or set "
                        "--max-prompt-length to cut long prompts from the left")
    if cfg.stage == "kto" and env.is_main:
        n_good = sum(it.label for it in train_items)
        advice = imbalance_advice(n_good, len(train_items) - n_good, cfg.desirable_weight, cfg.undesirable_weight)
        if advice:
            log.warning(advice)
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
    dtype = loaded_dtype(cfg, precision)
    start_copy = None
    if inputs.model is not None:
        policy = policy_in_place(inputs.model, load_device, dtype)
        if _copies_reference(cfg, policy, inputs):
            # Taken before adapters, checkpointing or compilation change the policy: the starting model.
            start_copy = frozen(policy, load_device, precision, copied=True)
            set_compute_dtype(start_copy, precision.compute)
    elif cfg.stage == "rm":
        torch.manual_seed(cfg.seed)  # a new score head is drawn from the torch random state, as in TRL
        policy = start_reward_model(cfg.model, device=load_device, dtype=dtype,
                                    trust_remote_code=cfg.trust_remote_code,
                                    quantization_config=lora.quantization_config(cfg, precision.compute or dtype))
    else:
        policy = load_model(cfg.model, device=load_device, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                            quantization_config=lora.quantization_config(cfg, precision.compute or dtype))
    require_items_fit(policy, [*train_items, *eval_items],
                      f"--model {cfg.model}" if inputs.model is None else "the model given")
    if cfg.stage == "rm":
        _check_reward_model(policy)
        if note := training_pad_token(policy, tokenizer):
            log.warning(note)
    given_adapters = is_peft_model(policy)  # a peft model passed in or an adapter folder: its adapters may be trained
    if given_adapters:
        _train_given_adapters(policy, cfg)
    adapters = bool(cfg.lora_r) or given_adapters
    set_compute_dtype(policy, precision.compute)
    if cfg.fused_norms:  # the policy only: a frozen reference has no backward, and the fused norm is one
        use_fused_norms(policy)
    if cfg.stage != "sft" and cfg.disable_dropout:
        disable_dropout(policy)
    if cfg.gradient_checkpointing and not any(getattr(m, "gradient_checkpointing", False) for m in policy.modules()):
        enable = getattr(policy, "activation_checkpointing_enable", None)  # the newer name, transformers >= 5.x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy._preftune_checkpointing = True  # turned on for this run: `release` turns it off
    cache_off_for_training(policy)
    if cfg.lora_r:
        policy = lora.add_adapters(policy, cfg)
    # After adapters: an MLP whose down_proj carries one keeps its own forward. Not under --compile: the compiler
    # chooses what to recompute itself, and the fused backward's autograd.grad would break each layer's graph.
    if cfg.fused_mlps and not cfg.compile:
        use_fused_mlps(policy)
    # Compiled decoders take the plain layout: one call per group, no key/value cache, so one graph without breaks.
    sharing = cfg.prefix_sharing and not cfg.compile
    if cfg.compile:
        _compile_body(policy)
    # A single process steps the embedding's row-sparse gradient itself (training.optim.AdamW); DDP and FSDP
    # reduce dense gradients.
    sparse_embedding_grad(policy, cfg.stage != "rm" and not env.enabled)
    if cfg.stage == "rm":
        router_coef = 0.0
        logp = RewardModule(policy, env=env)
    else:
        router_coef = router_aux_coef(policy, cfg.router_aux_loss_coef)
        logp = AnswerLogpModule(policy, prefix_sharing=sharing, chunk_size=cfg.logits_chunk_size,
                                trim_padding=cfg.trim_padding, env=env, fsdp=cfg.fsdp, router_aux=router_coef != 0,
                                packing=cfg.packing)
    if uses_reference(cfg) and not cfg.precompute_ref:
        if adapters and not (cfg.ref_model or inputs.ref_model is not None):
            # No second copy: new adapters start at zero, so the base weights alone are the starting model; adapters
            # that came with the model (an SFT LoRA run) are swapped back to their starting values instead.
            kind = StartAdaptersReference if given_adapters else AdaptersOffReference
            reference = kind(logp.eval_model, prefix_sharing=sharing, chunk_size=cfg.logits_chunk_size,
                             trim_padding=cfg.trim_padding, packing=cfg.packing)
        else:
            # A copy of its own keeps only the input-embedding rows the run's data looks up (models/narrow.py).
            own = not sharded and (start_copy is not None or inputs.ref_model is None)
            keep = (lambda: token_ids_of(train_items + eval_items, extra=(tokenizer.pad_token_id, 0))) if own else None
            if start_copy is not None:
                ref_model = start_copy
                _narrow(ref_model, keep)
            else:
                ref_model = _load_reference(cfg, load_device, precision, inputs.ref_model, keep=keep)
            _check_same_vocabulary(policy, ref_model, cfg.ref_model or "the ref_model object")
            if cfg.compile:
                _compile_body(ref_model)
            if sharded:
                ref_model = sharded_logps_module(ref_model, prefix_sharing=sharing,
                                                 chunk_size=cfg.logits_chunk_size)
            reference = FrozenReference(ref_model, prefix_sharing=sharing, chunk_size=cfg.logits_chunk_size,
                                        trim_padding=cfg.trim_padding, packing=cfg.packing)
        if eval_items:
            eval_table = table_of(reference.logps, eval_items, pad_id=tokenizer.pad_token_id, device=device,
                                         batch_size=cfg.batch_size)
    why_plain = "--compile" if cfg.compile else "--no-prefix-sharing"
    packing = cfg.packing and cfg.trim_padding and not sharded
    notes = [layout_note(policy, sharing, why=why_plain, packing=packing)] if cfg.stage != "rm" else []
    margins = (margins_of(records), margins_of(eval_records)) if cfg.stage == "rm" else (None, None)
    return Setup(tokenizer, policy, reference, train_items, eval_items, records, report, stats, eval_stats,
                 eval_table, notes=notes, policy_logps=logp, dtype=dtype, router_aux_coef=router_coef,
                 margins=margins)


def release(model) -> None:
    """Undo what a run set on a model object for its own use, so that the caller goes on with a plain model: fused
    norm and MLP forwards (which do not pickle), compiled layers, the autocast dtype preftune's forwards read,
    gradients (a failed step leaves them, row-sparse for the embedding), the KV-cache setting, and gradient
    checkpointing the run turned on. What training means stays: the weights, adapters added with lora_r, dropout
    turned off (as TRL leaves it)."""
    use_plain_norms(model)
    use_plain_mlps(model)
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    body = body_of(model)
    if hasattr(body, WIDTH_MULTIPLE):
        delattr(body, WIDTH_MULTIPLE)
    set_compute_dtype(model, None)
    sparse_embedding_grad(model, False)
    for p in model.parameters():
        p.grad = None
    restore_cache_setting(model)
    for module in model.modules():
        if module.__dict__.pop("_preftune_checkpointing", False):
            _checkpointing_off(module)


def _checkpointing_off(model) -> None:
    """Gradient checkpointing off again, with the hook that made the embeddings' output require grad."""
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()


def _compile_body(model) -> None:
    """torch.compile the decoder in place, layer by layer; the answer-only projection stays eager.

    The layers share their code, so one compilation serves all of them (the whole body as one graph took over
    200 s for a 24-layer model on an H100 host; a layer takes seconds). Lengths vary from batch to batch, hence
    dynamic shapes, and the plain layout pads each call's width to a multiple of 8 (parts.WIDTH_MULTIPLE), on
    which the compiled graph is specialised. A body without a list of layers is compiled whole.
    """
    body = body_of(model)
    layers = next((m for m in body.children() if isinstance(m, torch.nn.ModuleList) and len(m)), None)
    for part in layers if layers is not None else [body]:
        part.compile(dynamic=True)
    setattr(body, WIDTH_MULTIPLE, 8)


def _check_reward_model(model) -> None:
    """A model object given to a reward-model run must already carry the scalar head (as TRL requires)."""
    name = type(model).__name__
    if not name.endswith("ForSequenceClassification") or getattr(model.config, "num_labels", None) != 1:
        raise ConfigError(f"model: a {name} is not a reward model; pass AutoModelForSequenceClassification."
                          "from_pretrained(path, num_labels=1), or the path")


def _load_reference(cfg: TrainConfig, device, precision: Precision, given=None, keep=None):
    """The reference model: `given` (an object, frozen in place) or loaded from `--ref-model` / `--model`; a loaded
    one with only the input-embedding rows of the token ids `keep()` gives, when `keep` is given."""
    if given is not None:
        model = frozen(given, device, precision, copied=False)
    else:
        # Read in the trained dtype and stored as `hold_frozen` says on the CPU, so the device never holds the
        # transient full-precision copy (nor the rows of the embedding that narrowing drops); only the final,
        # mostly-bf16 reference moves there.
        model = load_model(cfg.ref_model or cfg.model, device=torch.device("cpu"), dtype=precision.trained,
                           trust_remote_code=cfg.trust_remote_code, flag="--ref-model" if cfg.ref_model else "--model")
        hold_frozen(model, precision)
        freeze(model)
        _narrow(model, keep)
        model.to(device)
    set_compute_dtype(model, precision.compute)
    if cfg.disable_dropout:
        disable_dropout(model)
    return model


def _narrow(model, keep) -> None:
    """Narrow frozen `model`'s input embedding to the ids `keep()` gives (None: leave it whole); the ids are
    gathered only when the embedding can be narrowed."""
    if keep is not None and narrowable(model):
        narrow_input_embedding(model, keep())


def _check_same_vocabulary(policy, reference, name: str) -> None:
    """A reference scores the policy's token ids: a vocabulary of another size is another tokenizer."""
    if vocabulary_size(reference) != vocabulary_size(policy):
        raise ModelError(f"--ref-model {name}: its vocabulary has {vocabulary_size(reference):,} tokens and the "
                         f"policy's {vocabulary_size(policy):,}; the reference must use the policy's tokenizer (the "
                         f"model it was trained from, or a copy of it)")


def _train_given_adapters(policy, cfg: TrainConfig) -> None:
    """A model that comes with LoRA adapters (an SFT LoRA run folder, a peft model) trains those adapters on. peft
    loads a saved adapter frozen, for inference: its active adapter is made trainable again."""
    if cfg.lora_r:
        raise ConfigError(f"lora_r: {cfg.model or 'the model'} already carries LoRA adapters, which this run trains "
                          f"on; drop lora_r (--merge still writes merged/), or start from a merged model for new "
                          f"adapters (the run that trained them writes merged/ with --merge)")
    if not any(p.requires_grad for p in policy.parameters()):
        name = policy.active_adapter
        policy.set_adapter(name)
        policy.peft_config[name].inference_mode = False


def _copies_reference(cfg: TrainConfig, policy, inputs: RunInputs) -> bool:
    """A policy object with no reference given serves as its own reference: frozen copy, made once."""
    given = cfg.ref_model or inputs.ref_model is not None
    return (uses_reference(cfg) and not cfg.precompute_ref and not given and not cfg.lora_r
            and not is_peft_model(policy))


def _cached_reference(cfg: TrainConfig, tokenizer, train_items, eval_items, device, precision: Precision,
                      env: DistEnv):
    """(CachedReference for training, [N_eval, 2] eval table or None), from the on-disk cache or computed once.

    Under torchrun each rank computes every world-th pair and a sum over ranks assembles the whole table."""
    from ..dist.env import all_reduce_sum, barrier
    from .reference_cache import CacheRequest, cached_tables, compute_table, default_cache_dir

    settings = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                "dtype": str(precision.frozen), "compute": str(precision.compute), "held": "linear weights frozen"}

    def compute(model, items):
        require_items_fit(model, items, f"--ref-model {cfg.ref_model}" if cfg.ref_model else f"--model {cfg.model}")
        mine = items[env.rank::env.world_size]
        part = compute_table(model, mine, pad_id=tokenizer.pad_token_id, device=device, batch_size=cfg.batch_size,
                             prefix_sharing=cfg.prefix_sharing, chunk_size=cfg.logits_chunk_size,
                             trim_padding=cfg.trim_padding, packing=cfg.packing)
        rows = max(it.index for it in items) + 1
        table, filled = torch.zeros(rows, part.shape[1], dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
        idx = [it.index for it in mine]
        table[idx], filled[idx] = part[idx].double(), 1.0
        table, filled = all_reduce_sum(table, env), all_reduce_sum(filled, env)
        return table.float().masked_fill(filled[:, None] == 0, float("nan"))

    tables, messages = cached_tables(
        [CacheRequest("train", train_items), CacheRequest("eval", eval_items)],
        reference=cfg.ref_model or cfg.model, settings=settings,
        cache_dir=_ref_cache_dir(cfg, default_cache_dir()),
        load_model=lambda: _load_reference(cfg, device, precision), compute=compute, is_main=env.is_main,
        barrier=lambda: barrier(env))
    barrier(env)
    if env.is_main and not cfg.quiet:
        for line in messages:
            print(line, flush=True)
    eval_table = tables["eval"][[it.index for it in eval_items]] if eval_items else None
    return CachedReference(tables["train"]), eval_table
