"""The training loop shared by SFT and DPO. Read it top to bottom: set up, then `for step ...`, then save.

Distribution, the reference strategy, checkpointing and reporting come in as parts; the loop never asks which
loss or which stage it runs.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.batching import PromptAnswerBatch, collate, epoch_order, total_steps
from ..dist.env import DistEnv, all_reduce_sum, init_from_env, rank_device, rank_slice, shutdown
from ..dist.fsdp import full_state_dict, full_tensor
from ..dist.logp_module import AnswerLogpModule
from ..errors import NonFiniteError
from ..logps.projection import reused_logits_buffer
from ..metrics import evaluate_during
from ..models.load import load_tokenizer
from ..models.lora import MERGED
from ..models.precision import pick_device, pick_precision
from ..report.progress import Progress, describe_eval
from ..report.tracking import METRICS_FILE, Tracker, check_sinks, read_metrics, recent_means
from . import checkpoint as ckpt
from . import input_digests
from . import run_dir as rundir
from .objectives import make_objective
from .optim import build_optimizer, clip_grad_norm
from .setup import build, loaded_dtype
from .signals import StopOnSignal, resume_command, terminated_as_interrupt

logger = logging.getLogger(__name__)  # `log` is the run's metrics-row function below
STOP = "stop"  # what a callback returns to end the run after the current step


@dataclass
class DataCursor:
    """Where the run is in its data: epoch and batch within it. The order of an epoch is a function of the seed.

    An epoch is whole optimizer steps of `grad_accum` batches: the batches short of a full last step are left out
    of it, as the examples short of a full last batch are (`epoch_order`), so no step spans two epochs."""

    n_items: int
    global_batch: int
    seed: int
    group_by_length: bool
    epoch: int = 0
    position: int = 0
    grad_accum: int = 1
    _batches: list[list[int]] = field(default_factory=list, repr=False)

    def next(self, items) -> list[int]:
        if not self._batches:
            self._batches = epoch_order(items, batch_size=self.global_batch, seed=self.seed, epoch=self.epoch,
                                        group_by_length=self.group_by_length)
        if self.position >= len(self._batches) - len(self._batches) % self.grad_accum:
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = []
            return self.next(items)
        batch = self._batches[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._batches = state["epoch"], state["position"], []


def _step_batches(cursor: DataCursor, items, cfg: TrainConfig, env: DistEnv, pad_id: int, device):
    """This rank's micro-batches of one optimizer step, and the indices of the whole step (for messages)."""
    global_batches = [cursor.next(items) for _ in range(cfg.grad_accum)]
    local = [collate([items[i] for i in rank_slice(b, env)], pad_id).to(device) for b in global_batches]
    return local, [i for b in global_batches for i in b]


def _grad_norm(params, max_norm: float) -> torch.Tensor:
    # Under FSDP the norm comes back sharded: make it the whole model's norm on every rank.
    return full_tensor(clip_grad_norm(params, max_norm))


def train_step(policy_logps: AnswerLogpModule, reference, objective, micro: list[PromptAnswerBatch], env: DistEnv,
               params, cfg: TrainConfig) -> tuple[dict[str, float], torch.Tensor, float]:
    """Forward and backward over the step's micro-batches. Returns (metrics, grad norm, units in the step).

    Each micro-batch's summed loss is divided by the units of the whole step on all ranks (pairs, or answer
    tokens for SFT), so accumulation and data parallelism give the gradient of one big batch.
    """
    with reused_logits_buffer():
        return _train_step(policy_logps, reference, objective, micro, env, params, cfg)


def _train_step(policy_logps, reference, objective, micro, env, params, cfg):
    local_units = sum(objective.units(b) for b in micro)
    units = float(all_reduce_sum(torch.tensor(local_units, dtype=torch.float64), env))
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro):
        ref = reference.logps(batch) if reference is not None else None
        with policy_logps.sync(i == len(micro) - 1):
            out = policy_logps(batch)
            c = objective(out, batch, ref)
            (c.loss_sum * (env.world_size / units)).backward()
        for k, v in c.sums.items():
            sums[k] = sums.get(k, 0.0) + v.double()
    names = sorted(sums)
    reduced = all_reduce_sum(torch.stack([sums[k] for k in names]), env) if names else []
    metrics = objective.finish(dict(zip(names, reduced.tolist() if names else [])), units)  # one device read
    return metrics, _grad_norm(params, cfg.max_grad_norm), units


def _finite_or_skipped(step: int, metrics: dict, grad_norm: torch.Tensor, records: list[str], cfg: TrainConfig,
                       bar) -> bool:
    """True when the step's loss and gradients are finite. Otherwise stop, naming the step and its records, or
    with --skip-nonfinite say so and return False (the step's update is dropped)."""
    if math.isfinite(metrics["loss"]) and bool(torch.isfinite(grad_norm)):
        return True
    where = ", ".join(records[:8])
    if not cfg.skip_nonfinite:
        raise NonFiniteError(f"step {step}: loss or gradients are not finite (records: {where}); lower --lr, check "
                             f"these records, or pass --skip-nonfinite")
    bar.print(f"step {step}: loss or gradients are not finite; step skipped (records: {where})")
    return False


def _planned_steps(cfg: TrainConfig, setup, env: DistEnv) -> int:
    global_batch = cfg.batch_size * env.world_size  # at least one step: setup.build checked it
    return total_steps(len(setup.train_items), global_batch, cfg.grad_accum, cfg.epochs, cfg.max_steps)


def run(cfg: TrainConfig, *, command: str | None = None) -> dict:
    """Train as `cfg` says; returns the final metrics. Writes the run folder on the main process."""
    cmd = command or shlex.join(["preftune", *sys.argv[1:]])
    outcome = execute(cfg, command=cmd, resume_hint=resume_command(cmd))
    return {"stopped_at_step": outcome.stopped_at} if outcome.stopped_at is not None else outcome.final


@dataclass
class Outcome:
    """What `execute` hands back: the final metrics, every metrics row it logged, and what it trained."""

    final: dict
    history: list[dict]
    setup: object | None = None       # setup.Setup; None when a finished run was found and nothing ran
    stopped_at: int | None = None     # the step a signal or a callback stopped the run after
    data_stats: dict = field(default_factory=dict)  # run_dir.data_counts: what of the data it trained on


def execute(cfg: TrainConfig, *, command: str, inputs=None, callbacks=(), in_memory: bool = False,
            resume_hint: str | None = None) -> Outcome:
    """The run itself. `inputs` (inputs.RunInputs): objects used in place of the config's paths.

    `callbacks`: functions called with each metrics row (training and eval) as it is logged; one that returns
    "stop" ends the run after that step, as a signal does. `in_memory`: write nothing (no run folder; the
    caller refuses checkpoints and resuming). `resume_hint`: printed after "Resume with:" when a run with a
    folder is stopped; None prints nothing.
    """
    if not in_memory:
        cfg.require_paths()
    check_sinks(cfg.report_to)  # everything checkable is checked before the first file is written
    device = pick_device(cfg.device)
    env = init_from_env(device.type)
    device = rank_device(device, env)
    precision = pick_precision(cfg.dtype, device)
    out_dir = Path(cfg.output_dir)
    if not in_memory and cfg.resume and (done := rundir.finished_results(out_dir)) is not None:
        # A job script that always passes --resume may run once more after the run finished: nothing to do, if it
        # asks for the same run (a sweep that reuses the folder with another --lr must not get the old result).
        if (out_dir / rundir.CONFIG).is_file():
            ckpt.check_same_config(out_dir, cfg)
        if cfg.merge and env.is_main and not (out_dir / MERGED).is_dir():  # its merge failed before
            rundir.write_merged_model(out_dir, cfg, load_tokenizer(str(out_dir), flag="--output-dir"),
                                      loaded_dtype(cfg, precision))
            if not cfg.quiet:
                print(f"preftune: resume: the run in {out_dir} has finished; wrote {out_dir / MERGED}",
                      file=sys.stderr)
        elif env.is_main and not cfg.quiet:
            print(f"preftune: resume: the run in {out_dir} has finished; nothing to do", file=sys.stderr)
        return Outcome(done, [])
    if in_memory:
        return _train(cfg, command, env, device, precision, out_dir, inputs, callbacks, in_memory, resume_hint)
    created = not out_dir.exists()
    rundir.prepare(out_dir, cfg, env)
    # A failure from here on (bad data or model, a full disk, a crash in step 1) leaves nothing behind that would
    # block the corrected rerun; once a checkpoint exists, the run stays for --resume.
    with terminated_as_interrupt(), rundir.locked(out_dir, env), \
            rundir.removed_on_failure(out_dir, env, created, resumed=cfg.resume) as kept:
        return _train(cfg, command, env, device, precision, out_dir, inputs, callbacks, in_memory, resume_hint,
                      kept)


def _train(cfg: TrainConfig, command: str, env: DistEnv, device, precision, out_dir: Path, inputs, callbacks,
           in_memory: bool, resume_hint: str | None, kept: set[str] | None = None) -> Outcome:
    writes = env.is_main and not in_memory  # only the main process of a run with a folder writes files
    torch.manual_seed(cfg.seed)
    if not in_memory:
        input_digests.pin(cfg)  # the files build() reads next, which checkpoints record
    setup = build(cfg, device=device, precision=precision, env=env, inputs=inputs)
    steps = _planned_steps(cfg, setup, env)
    if writes:
        ckpt.check_room(out_dir, setup.policy, cfg)
    if not in_memory:
        rundir.clear_previous(out_dir, cfg, env, kept)
    policy, tokenizer, reference = setup.policy, setup.tokenizer, setup.reference
    train_items, eval_items = setup.train_items, setup.eval_items
    pad_id = tokenizer.pad_token_id
    global_batch = cfg.batch_size * env.world_size
    start_line, counts = rundir.describe_start(cfg, setup, steps, global_batch), rundir.data_counts(setup, steps)
    if env.is_main and not cfg.quiet:  # in memory too: the counts of truncated and dropped examples are said
        print("\n".join([start_line, *setup.notes]), flush=True)
    elif env.is_main and rundir.leaves_out(setup, global_batch * cfg.grad_accum):
        logger.warning(start_line)  # a quiet run (the library's default) still says what of the data it leaves out

    objective = make_objective(cfg, env, router_aux_coef=setup.router_aux_coef, margins=setup.margins)
    policy_logps: AnswerLogpModule = setup.policy_logps
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, cfg, steps)
    cursor = DataCursor(len(train_items), global_batch, cfg.seed, cfg.group_by_length, grad_accum=cfg.grad_accum)
    state = ckpt.RunState(policy, optimizer, scheduler, cursor, objective, sharded=policy_logps.sharded)
    metrics_path = out_dir / METRICS_FILE
    if cfg.resume and not in_memory:
        message = ckpt.resume(out_dir, state, cfg, env, metrics_path)
        if env.is_main and not cfg.quiet:
            print(f"preftune: {message}", file=sys.stderr)
    if writes:  # after the checkpoint is accepted: a refused --resume leaves the run's own config as it was
        rundir.write_start(out_dir, cfg, setup, steps)
    eval_ref = setup.eval_reference_table
    tracker = Tracker(out_dir, cfg, is_main=writes)
    history: list[dict] = []

    def log(row: dict) -> None:
        tracker.log(row)
        history.append(row)
        answers = [fn(dict(row)) for fn in callbacks]  # every callback sees every row, a stop among them or not
        if STOP in answers:
            stop.request()

    last: dict = {}
    stopped = False
    optimizer.zero_grad(set_to_none=True)  # a model given in may carry gradients of its own (or of a failed run)
    policy.train()
    # Its handlers are in place from the first step until the final model is written. A run in memory has no
    # checkpoint to write, so a signal there stops the caller's process as it would without a run.
    stop = StopOnSignal(handle_signals=not in_memory)
    with Progress(steps, quiet=cfg.quiet or not env.is_main, stage=cfg.stage, log_every=cfg.log_every) as bar, stop:
        for step in range(state.step + 1, steps + 1):
            stop.finishing = step == steps  # a signal from here on lets the run finish instead
            t0 = time.perf_counter()
            micro, indices = _step_batches(cursor, train_items, cfg, env, pad_id, device)
            metrics, grad_norm, units = train_step(policy_logps, reference, objective, micro, env, params, cfg)
            finite = _finite_or_skipped(step, metrics, grad_norm, [setup.where(train_items[i]) for i in indices],
                                        cfg, bar)
            state.skipped_steps += not finite
            lr = optimizer.param_groups[0]["lr"]
            if finite:
                optimizer.step()
            scheduler.step()  # a skipped step still counts, so the schedule stays aligned with step numbers
            optimizer.zero_grad(set_to_none=True)
            state.step = step
            dt = time.perf_counter() - t0
            n = sum(b.size for b in micro) * env.world_size
            row = {"step": step, "epoch": cursor.epoch, **(metrics if finite else {}), "lr": lr,
                   **({"grad_norm": float(grad_norm)} if finite else {}), "skipped_steps": state.skipped_steps,
                   objective.throughput_key: n / dt,
                   "tokens_per_s": sum(b.tokens() for b in micro) * env.world_size / dt}
            log(row)
            bar.update(step, row)
            last = row
            if eval_items and cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
                eval_row = {"step": step, **evaluate_during(policy_logps.eval_model, eval_ref, eval_items, cfg, pad_id,
                                                            device, objective)}
                log(eval_row)
                bar.print(describe_eval(eval_row))
            # The last step needs no checkpoint: the final model is written next.
            stopped = step < steps and stop.requested(env)
            if not in_memory and (stopped or (cfg.save_every and step % cfg.save_every == 0 and step < steps)):
                ckpt.save(out_dir, state, cfg, env, metrics_path)
            if stopped:
                break
        final = dict(last)
        if eval_items and not stopped:
            eval_row = {"step": steps,
                        **evaluate_during(policy_logps.eval_model, eval_ref, eval_items, cfg, pad_id, device,
                                          objective)}
            log(eval_row)
            bar.print(describe_eval(eval_row))
            final.update(eval_row)
    if stopped:
        tracker.close()
        if writes and resume_hint is not None:
            under = f" (under torchrun with {env.world_size} processes, as now)" if env.world_size > 1 else ""
            print(f"preftune: stopped after step {state.step} of {steps}; checkpoint written. Resume with: "
                  f"{resume_hint}{under}", flush=True)
        shutdown(env)
        return Outcome(final, history, setup, stopped_at=state.step, data_stats=counts)
    with stop:  # a preemption notice while the final model is written lets the write finish (a second aborts)
        stop.finishing = True
        tracker.close()
        ckpt.require_finite(policy, "final model", env)
        # Sharded weights are gathered whole by every rank together; rank 0 alone writes them.
        full_weights = full_state_dict(policy) if policy_logps.sharded and not in_memory else None
        final.update(recent_means(read_metrics(out_dir) if writes else history))
        if writes:
            rundir.finish(out_dir, cfg, setup, final, command, state_dict=full_weights)
    shutdown(env)
    return Outcome(final, history, setup, data_stats=counts)
