"""The online run: rounds of generate (the current policy, seeded), judge, pair, then DPO steps on the pairs.

Each round trains through the DPO stage itself (`api.train` with the round's pairs in memory), in its own run
folder RUN/rounds/NNN/train, so every loss, checkpointing and exact resume come from the training loop unchanged.
A round starts from the policy the last round saved; the reference is --model (or, with --ref-update round, the
policy the round starts from). The folder:

    RUN/config.yaml                  the resolved settings (`--config` takes it back)
    RUN/metrics.jsonl                one row per round (round 0: the starting model's held-out score)
    RUN/rounds/NNN/samples.jsonl     every prompt's answers and their scores
    RUN/rounds/NNN/pairs.jsonl       the pairs trained on: prompt, chosen, rejected, score_chosen, score_rejected
    RUN/rounds/NNN/train/            the round's DPO run folder (checkpoints, metrics, the round's model)
    RUN/plots/online.png             judged scores over rounds
    RUN/ model files, results.json   the final policy, written when the last round has finished

Resume: a round whose pairs.jsonl exists reuses it (generation is seeded too, so regenerating would give the
same pairs); its DPO steps continue from their last checkpoint; finished rounds are skipped.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..config import load_yaml_mapping
from ..data.encode import encode_prompt
from ..data.memory import as_source
from ..inputs import RunInputs
from ..errors import ConfigError, PreftuneError
from ..io import append_jsonl, atomic_write_json, write_jsonl
from ..report.tracking import METRICS_FILE
from ..training.checkpoint import MAY_CHANGE_ON_RESUME
from ..training.loop import STOP, execute
from ..training.run_dir import remove_outputs, resolved
from ..training.signals import StopOnSignal
from .config import OnlineConfig
from .judges import Judge, judged, make_judge
from .pairs import RoundPairs, best_vs_worst, training_record
from .prompts import read_prompts, split_prompts

ROUNDS = "rounds"
SAMPLES, PAIRS, TRAIN = "samples.jsonl", "pairs.jsonl", "train"
RESULTS = "results.json"
ROUND_SEED_STRIDE = 100_003  # seeds of different rounds' generation batches never coincide


@dataclass
class OnlineResult:
    """What `run_online` returns: the final policy and tokenizer, one metrics row per round (round 0 first),
    the run folder, and the round and step a signal or a callback stopped the run at (None when it finished)."""

    model: object
    tokenizer: object
    history: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    stopped_at: tuple[int, int] | None = None

    @property
    def metrics(self) -> dict:
        return dict(self.history[-1]) if self.history else {}


def round_dir(out_dir: Path, r: int) -> Path:
    return Path(out_dir) / ROUNDS / f"{r:03d}"


def run_online(cfg: OnlineConfig, *, judge: Judge | None = None, prompts=None, eval_prompts=None,
               callbacks: Iterable[Callable[[dict], object]] = (), resume_hint: str | None = None) -> OnlineResult:
    """Run (or, with cfg.resume, continue) the rounds `cfg` describes.

    `judge`: a judge function used instead of `cfg.judge`; `prompts`, `eval_prompts`: lists of prompt records
    used instead of the files. `callbacks` see every training row of every round (with its "round") and every
    round row; one returning "stop" stops the run after that step with a checkpoint, as SIGTERM does.
    """
    out = Path(cfg.output_dir)
    if not cfg.prompts and prompts is not None:
        cfg.prompts = "<prompts>"
    if not cfg.judge and judge is not None:
        cfg.judge = "<judge>"
    cfg.require_paths()
    if cfg.resume:  # a finished run too: one resumed with more rounds is not that run
        _require_same_settings(cfg, out)
    if cfg.resume and _finished(out) is not None:
        if not cfg.quiet:
            print(f"preftune: resume: the run in {out} has finished; nothing to do", file=sys.stderr)
        return _load_final(cfg, out)
    created = not out.exists()
    _prepare(out, cfg)
    wrote: list[bool] = []  # set once this command has written into the folder (an old run's files then gone)
    # A failure before any round has trained (bad prompts, judge, model) leaves nothing that blocks the rerun, and
    # one before this command wrote anything leaves the folder as it found it.
    try:
        return _rounds(cfg, out, judge, prompts, eval_prompts, callbacks, resume_hint, wrote)
    except BaseException:
        if not cfg.resume and not any(out.glob(f"{ROUNDS}/*/{TRAIN}")):
            if created:
                shutil.rmtree(out, ignore_errors=True)
            elif wrote:
                for name in ("config.yaml", METRICS_FILE):
                    (out / name).unlink(missing_ok=True)
                shutil.rmtree(out / ROUNDS, ignore_errors=True)
        raise


def _rounds(cfg: OnlineConfig, out: Path, judge, prompts, eval_prompts, callbacks, resume_hint,
            wrote: list) -> OnlineResult:
    from ..models.load import load_tokenizer
    from ..models.precision import pick_device

    train_prompts, held_out, notes = _prompt_sets(cfg, prompts, eval_prompts)
    device = pick_device(cfg.train_config(output_dir="", model=cfg.model).device)
    judge = judge or make_judge(cfg.judge, device=device)
    tokenizer = load_tokenizer(cfg.dpo.get("tokenizer") or cfg.model,
                               trust_remote_code=cfg.train_config(output_dir="", model=cfg.model).trust_remote_code)
    if not cfg.resume:
        wrote.append(True)
    if cfg.overwrite and not cfg.resume:  # only now: a command refused for its prompts, judge or model changes nothing
        remove_outputs(out, (ROUNDS, "plots"))
    cfg.to_yaml(out / "config.yaml")
    if not cfg.quiet:
        for line in notes:
            print(f"preftune: {line}", file=sys.stderr)
    history = _read_rows(out) if cfg.resume else []
    done_rounds = {row["round"] for row in history}
    callbacks = list(callbacks)

    asked = []  # a callback's "stop" on a round row: the run stops once that round is done

    def log(row: dict) -> None:
        append_jsonl(out / METRICS_FILE, row)
        history.append(row)
        answers = [fn(dict(row)) for fn in callbacks]
        if STOP in answers:
            asked.append(row["round"])

    with StopOnSignal() as stop:
        if 0 not in done_rounds and held_out:
            policy = _load_policy(cfg, cfg.model, device)
            log({"round": 0, "step": 0, **greedy_score(cfg, policy, tokenizer, judge, held_out, device)})
            del policy
        policy = None
        for r in range(1, cfg.rounds + 1):
            if r in done_rounds:
                continue
            if stop.signum is not None or asked:  # asked: by a callback, on a round row or in a round's steps
                return _stopped(cfg, out, history, tokenizer, r, 0, resume_hint)
            start = cfg.model if r == 1 else str(round_dir(out, r - 1) / TRAIN)
            policy = _load_policy(cfg, start, device)
            made = _round_pairs(cfg, out, r, policy, tokenizer, judge, train_prompts, device)
            if stop.signum is not None:  # a signal during generation: the pairs are written, the round resumes
                return _stopped(cfg, out, history, tokenizer, r, 0, resume_hint)
            result = _train_round(cfg, out, r, policy, tokenizer, start, made, callbacks, asked)
            if result.stopped_at_step is not None:
                return _stopped(cfg, out, history, tokenizer, r, result.stopped_at_step, resume_hint)
            policy = result.model
            row = {"round": r, "step": r * cfg.steps_per_round, "score_mean": made.score_mean,
                   "score_std": made.score_std, "pair_share": made.pair_share, "pairs": len(made.pairs),
                   "tied_groups": made.tied_groups, "empty_answers": made.empty_answers,
                   "short_groups": made.short_groups, "cut_answers": made.cut_answers,
                   **{f"train_{k}": v for k, v in result.metrics.items()
                      if k in ("loss", "reward_accuracy", "reward_margin")}}
            if held_out:
                row.update(greedy_score(cfg, policy, tokenizer, judge, held_out, device))
            log(row)
            if not cfg.quiet:
                print(_describe(row), flush=True)
    if policy is None:  # every round had finished before: the last round's model is the final one
        policy = _load_policy(cfg, str(round_dir(out, cfg.rounds) / TRAIN), device)
    _finish(out, policy, tokenizer, history)
    return OnlineResult(policy, tokenizer, history, out)


# ------------------------------------------------------------------------------------------ one round

def _round_pairs(cfg: OnlineConfig, out: Path, r: int, policy, tokenizer, judge: Judge, prompts: list[dict],
                 device) -> RoundPairs:
    """The round's judged samples and pairs: read back when written before (resume), else generated, judged and
    written (samples first, pairs last, each atomically: pairs.jsonl existing means the round's data is done)."""
    from ..generate import sample_ended_groups

    folder = round_dir(out, r)
    if (folder / PAIRS).exists():
        samples = [json.loads(line) for line in (folder / SAMPLES).read_text().splitlines()]
        if [s["prompt"] for s in samples] != [p["prompt"] for p in prompts]:
            raise PreftuneError(f"{folder / SAMPLES}: its prompts are not the run's prompts; resume with the "
                                f"prompts the run started with, or start afresh with --overwrite")
        ended = [s.get("ended", [True] * len(s["answers"])) for s in samples]  # written before it was recorded
        return best_vs_worst(prompts, [s["answers"] for s in samples], [s["scores"] for s in samples], ended,
                             pair_cut=cfg.pair_cut_answers)
    ids = [encode_prompt(tokenizer, p["prompt"], p["system"], p["where"],
                         template_kwargs=p.get("template_kwargs")) for p in prompts]
    answers, ended = sample_ended_groups(policy, tokenizer, ids, samples=cfg.samples,
                                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         top_p=cfg.top_p, seed=cfg.seed + r * ROUND_SEED_STRIDE, device=device,
                                         batch_size=cfg.generation_batch_size)
    scores = [judged(judge, p["prompt"], group, p["where"], p["system"]) for p, group in zip(prompts, answers)]
    made = best_vs_worst(prompts, answers, scores, ended, pair_cut=cfg.pair_cut_answers)
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / SAMPLES, [{"prompt": p["prompt"], "answers": a, "scores": s, "ended": e}
                                   for p, a, s, e in zip(prompts, answers, scores, ended)])
    write_jsonl(folder / PAIRS, made.pairs)
    return made


def _train_round(cfg: OnlineConfig, out: Path, r: int, policy, tokenizer, start: str, made: RoundPairs, callbacks,
                 asked: list):
    """The round's DPO steps. A callback's "stop" is noted in `asked` too: on the round's last step the DPO run has
    nothing left to stop, and the online run stops after the round."""
    settings = cfg.train_config(output_dir="", model=cfg.model)
    batch = settings.batch_size * settings.grad_accum  # one optimizer step (a single process)
    if len(made.pairs) < batch:
        cut = (f"; {made.cut_answers} answers reached --max-new-tokens without ending and are never paired: raise "
               f"--max-new-tokens (or pass --pair-cut-answers)" if made.cut_answers and not cfg.pair_cut_answers
               else "")
        raise PreftuneError(f"round {r}: {len(made.pairs)} of {made.groups} prompts gave a pair ({made.tied_groups} "
                            f"had answers the judge scored all the same, {made.short_groups} fewer than two non-empty "
                            f"finished answers), fewer than one step of {batch}; add "
                            f"prompts, raise --samples or --temperature, lower --batch-size, or check the judge{cut} "
                            f"(a resumed run reuses this round's samples: start afresh with --overwrite)")
    train_dir = round_dir(out, r) / TRAIN
    ref = cfg.model if cfg.ref_update == "none" else start
    tcfg = cfg.train_config(output_dir=str(train_dir), model=f"<round {r} policy>", ref_model=ref,
                            resume=train_dir.exists())
    inputs = RunInputs(model=policy, tokenizer=tokenizer,
                       data=as_source([training_record(p) for p in made.pairs], "data"))
    def tagged_call(fn, row):
        answer = fn({**row, "round": r})
        if answer == STOP:
            asked.append(r)
        return answer

    tagged = [lambda row, fn=fn: tagged_call(fn, row) for fn in callbacks]
    outcome = execute(tcfg, command=f"# round {r} of an online run in {out}", inputs=inputs, callbacks=tagged)
    if outcome.setup is not None:
        trained = outcome.setup.policy
        trained.config.use_cache = True  # training turned the KV cache off; the next round generates with it
    else:  # resume found the round's training finished: its saved model is the round's policy
        trained = _load_policy(cfg, str(train_dir), policy.device)
    trained.eval()
    return RoundTrained(trained, outcome.final, outcome.stopped_at)


@dataclass
class RoundTrained:
    model: object
    metrics: dict
    stopped_at_step: int | None


def greedy_score(cfg: OnlineConfig, policy, tokenizer, judge: Judge, prompts: list[dict], device) -> dict:
    """Greedy answers of `policy` to `prompts` (records from `read_prompts`), judged: their mean score and spread
    as {"eval_score", "eval_score_std"}."""
    from ..generate import sample_groups

    ids = [encode_prompt(tokenizer, p["prompt"], p["system"], p["where"],
                         template_kwargs=p.get("template_kwargs")) for p in prompts]
    answers = sample_groups(policy, tokenizer, ids, samples=1, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                            top_p=1.0, seed=cfg.seed, device=device, batch_size=cfg.generation_batch_size)
    scores = [judged(judge, p["prompt"], a, p["where"], p["system"])[0] for p, a in zip(prompts, answers)]
    return {"eval_score": statistics.fmean(scores), "eval_score_std": statistics.pstdev(scores)}


# ------------------------------------------------------------------------------------------ the folder

def _prepare(out: Path, cfg: OnlineConfig) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out}: exists and is not a folder")
    holds = any((out / name).exists() for name in ("config.yaml", METRICS_FILE, ROUNDS))
    if holds and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"--output-dir {out}: already holds a run; choose another folder, pass --resume to "
                            f"continue it, or --overwrite to start afresh")
    model, run = Path(cfg.model).expanduser().resolve(), out.expanduser().resolve()
    if cfg.model and (model == run or run in model.parents):
        raise ConfigError(f"--output-dir {out}: holds the --model folder, which every round reads (the reference, the "
                          "first round's policy) and a new run would remove; choose another folder")
    if (out / "config.json").is_file() and not holds and not cfg.overwrite:
        raise ConfigError(f"--output-dir {out}: holds a model (config.json), which the finished run's model would "
                          "overwrite; choose another folder, or --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--output-dir {out}: cannot write there ({exc.strerror})") from None


def _require_same_settings(cfg: OnlineConfig, out: Path) -> None:
    """A resumed run continues with the settings it started with: rounds sampled, judged or trained under other
    ones would make one run of two. Compared as resolved values (a default given or left out alike, paths made
    absolute); what a resume may change offline (checkpointing, logging, the device) may change here too."""
    path = out / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = OnlineConfig.from_dict(load_yaml_mapping(path), where=str(path))
    except PreftuneError as exc:
        raise ConfigError(f"--resume: {path} is not an online run's settings ({exc}); resume the run that folder "
                          "holds with its own command, or choose another folder") from None
    changed = [f"{k} {a!r} (now {b!r})" for k, a, b in _setting_pairs(saved, cfg) if a != b]
    if changed:
        raise ConfigError(f"--resume: the run in {out} was started with {', '.join(changed[:3])}"
                          f"{' and more' * (len(changed) > 3)}; resume it with the settings it started with (its "
                          "config.yaml), or start afresh with --overwrite")


def _setting_pairs(saved: OnlineConfig, now: OnlineConfig):
    """(name, saved value, value now) of every setting a resume must keep: the rounds' settings as config.yaml
    writes them (paths absolute), and their DPO steps' as a DPO run's config.yaml does (`run_dir.resolved`)."""
    kept = [c.written() for c in (saved, now)]
    for name in OnlineConfig.__dataclass_fields__:
        if name not in ("resume", "overwrite", "quiet", "output_dir", "dpo"):  # the batch size seeds the samples
            yield name, kept[0][name], kept[1][name]
    steps = [resolved(c.train_config(output_dir="", model="<policy>")).to_dict() for c in (saved, now)]
    for name in steps[0]:
        if name not in MAY_CHANGE_ON_RESUME and name not in ("model", "ref_model", "data"):
            yield name, steps[0][name], steps[1][name]


def _prompt_sets(cfg: OnlineConfig, prompts, eval_prompts) -> tuple[list[dict], list[dict], list[str]]:
    split = cfg.train_config(output_dir="", model="x").split  # of a saved dataset or Hub id
    train, notes = read_prompts(prompts if prompts is not None else cfg.prompts, "--prompts", split)
    held: list[dict] = []
    if eval_prompts is not None or cfg.eval_prompts:
        held, more = read_prompts(eval_prompts if eval_prompts is not None else cfg.eval_prompts, "--eval-prompts",
                                  split)
        notes += more
    elif cfg.eval_split:
        train, held = split_prompts(train, cfg.eval_split, cfg.seed)
    return train, held, notes


def _load_policy(cfg: OnlineConfig, path: str, device):
    """A round's starting policy from its folder, in the dtype training keeps its weights in."""
    from ..models.load import load_model
    from ..models.precision import pick_precision

    tcfg = cfg.train_config(output_dir="", model=cfg.model)
    precision = pick_precision(tcfg.dtype, device)
    return load_model(path, device=device, dtype=precision.trained, trust_remote_code=tcfg.trust_remote_code,
                      flag="--model")


def _read_rows(out: Path) -> list[dict]:
    path = out / METRICS_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def _finished(out: Path) -> dict | None:
    try:
        return json.loads((out / RESULTS).read_text())
    except (OSError, ValueError):
        return None


def _finish(out: Path, policy, tokenizer, history: list[dict]) -> None:
    """The final policy in Hugging Face format, the round plot, and results.json last (its presence: finished)."""
    from ..models.load import save_model
    from ..report.plots import plot_online_rounds

    save_model(policy, tokenizer, out)
    plot_online_rounds(history, out / "plots" / "online.png")
    atomic_write_json(out / RESULTS, history[-1] if history else {})


def _load_final(cfg: OnlineConfig, out: Path) -> OnlineResult:
    from ..models.load import load_tokenizer
    from ..models.precision import pick_device

    device = pick_device(cfg.train_config(output_dir="", model=cfg.model).device)
    return OnlineResult(_load_policy(cfg, str(out), device), load_tokenizer(str(out)), _read_rows(out), out)


def _stopped(cfg: OnlineConfig, out: Path, history, tokenizer, r: int, step: int, hint: str | None) -> OnlineResult:
    if hint is not None:
        print(f"preftune: stopped in round {r} after step {step} of {cfg.steps_per_round}; resume with: {hint}",
              flush=True)
    return OnlineResult(None, tokenizer, history, out, stopped_at=(r, step))


def _describe(row: dict) -> str:
    text = (f"round {row['round']}: judge score {row['score_mean']:.4g} ± {row['score_std']:.3g}, "
            f"{row['pairs']} pairs ({row['pair_share']:.0%} of prompts)")
    if row.get("cut_answers"):
        text += f", {row['cut_answers']} answers cut off at --max-new-tokens"
    if "eval_score" in row:
        text += f", held-out greedy score {row['eval_score']:.4g}"
    return text
