"""preftune and TRL's DPOTrainer on one GPU with a Qwen2-0.5B-shaped random model on HH pairs.

    python benchmarks/gpu_qwen.py --fixture FX [--lengths 1024,2048] [--steps 16] [--out-dir DIR]

FX is the shared benchmark fixture (only its tokenizer and pairs are used). The model has Qwen2-0.5B's shape:
vocab 151,936, hidden 896, intermediate 4,864, 24 layers, 14 heads, 2 KV heads, tied embeddings; random
weights (seed 0), stored in bf16. Every run: batch 8, lr 1e-6, beta 0.1, AdamW, no gradient checkpointing, the
same pairs (batch x steps of them, one epoch), its own subprocess, a time limit of its own.

Rows: preftune's defaults (fp32 trained weights under bf16 autocast, bf16 frozen reference) and pure bf16, each
layout idea switched off on its own, and TRL at its best single-GPU settings (bf16 weights; with reference
log-probs precomputed; with Liger's kernels when installed). TRL 1.16's DPO has `padding_free` switched off
("temporarily unavailable"), so it has no row.

Reported per run: pairs/s (batch over the mean step time after the first; median beside it), peak GPU memory
(torch.cuda.max_memory_allocated), first loss, and MFU: the run's own useful FLOPs per second (benchmarks/flops.py:
real tokens only; preftune's prompt once and answer-only projection, TRL's two full rows) over the GPU's dense
bf16 peak, nominal and as measured here with a large matmul. A profile of preftune's default step and a check of
the fast log-prob paths against a whole-model forward on the GPU come first. Results stream to DIR as they come.
`--smoke` runs a 2-layer version on the CPU (fp32, 2 steps, short sequences) to check the script itself.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))
from flops import Shape, matmul_rate, mean_pair_flops  # noqa: E402

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1_000_000.0, tie_word_embeddings=True)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}

# name -> (tool, flags). preftune flags are CLI flags; TRL's are DPOConfig fields (and a model dtype).
RUNS = {  # id: (row label, tool, flags)
    "pt": ("preftune defaults (fp32 weights, bf16 autocast)", "preftune", []),
    "pt-bf16": ("preftune pure bf16", "preftune", ["--dtype", "bfloat16"]),
    "trl": ("TRL bf16", "trl", []),
    "trl-precompute": ("TRL bf16, precompute_ref_log_probs", "trl", ["precompute"]),
    "trl-liger": ("TRL bf16, Liger kernels", "trl", ["liger"]),
    "pt-noshare": ("preftune defaults, no prefix sharing", "preftune", ["--no-prefix-sharing"]),
    "pt-notrim": ("preftune defaults, no padding trim", "preftune", ["--no-trim-padding"]),
    "pt-padded": ("preftune defaults, one padded batch (neither)", "preftune", ["--no-prefix-sharing", "--no-trim-padding"]),
    "pt-precompute": ("preftune defaults, --precompute-ref", "preftune", ["--precompute-ref"]),
    "pt-compile": ("preftune defaults, --compile", "preftune", ["--compile"]),
    "pt-compile-padded": ("preftune defaults, --compile, one padded batch", "preftune",
                          ["--compile", "--no-trim-padding"]),
    "pt-bf16-compile": ("preftune pure bf16, --compile", "preftune", ["--dtype", "bfloat16", "--compile"]),
    "pt-fused-norms": ("preftune defaults, --fused-norms", "preftune", ["--fused-norms"]),
    "pt-plain-mlps": ("preftune defaults, --no-fused-mlps (as before 2026-11-27 19:40)", "preftune",
                      ["--no-fused-mlps"]),
    # Probes: settings tried on the GPU before they became (or did not become) defaults.
    "pt-padded-nocudnn": ("preftune one padded batch, cuDNN attention off", "preftune",
                          ["--no-prefix-sharing", "--no-trim-padding", "probe:no-cudnn-sdp"]),
    "pt-nocudnn": ("preftune defaults, cuDNN attention off", "preftune", ["probe:no-cudnn-sdp"]),
    "pt-call16k-nocudnn": ("preftune defaults, call cost 16k tokens, cuDNN off", "preftune",
                           ["probe:call-cost=16384", "probe:no-cudnn-sdp"]),
    "trl-precompute-nocudnn": ("TRL bf16, precompute_ref_log_probs, cuDNN attention off", "trl",
                               ["precompute", "probe:no-cudnn-sdp"]),
}
CORE = ["pt", "pt-bf16", "trl", "trl-precompute"]


def plan(lengths: list[int], wanted: list[str] | None) -> list[tuple[str, int]]:
    """Runs asked for by id: in that order, at every length. By default the core rows at every length first, then
    the variants at the first length, --compile (slowest) last; probes only when asked for."""
    if wanted:
        return [(n, x) for x in lengths for n in wanted]
    order = [(n, lengths[0]) for n in RUNS if n in CORE or n == "trl-liger"]
    order += [(n, x) for x in lengths[1:] for n in CORE]
    return order + [(n, lengths[0]) for n in RUNS if (n, lengths[0]) not in order and "probe:" not in str(RUNS[n])]


def build_model(fixture: Path, out: Path, layers: int, device: str) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(fixture / "model")
    torch.manual_seed(0)
    cfg = Qwen2Config(**{**QWEN2_05B, "num_hidden_layers": layers}, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):  # initialising 0.5B weights on a GPU takes a second, on a CPU a minute
        model = Qwen2ForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pair_rows(fixture: Path, n: int) -> list[dict]:
    rows = [json.loads(x) for x in (fixture / "pairs.jsonl").read_text().splitlines()]
    # HH has a few empty answers; preftune refuses them (TRL would train on a bare EOS): leave them out for both.
    return [r for r in rows if r["chosen"].strip() and r["rejected"].strip()][:n]


def token_lengths(model_dir: Path, rows: list[dict], max_length: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) tokens of each pair after truncation (preftune's rule, which is TRL's)."""
    from preftune.data.records import PreferencePair
    from preftune.data.tokenize import tokenize_all
    from preftune.models.load import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    items, _ = tokenize_all(tok, [PreferencePair(r["prompt"], r["chosen"], r["rejected"], None, "") for r in rows],
                            max_length=max_length)
    return [(len(i.prompt_ids), len(i.chosen_ids), len(i.rejected_ids)) for i in items]


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")


# ------------------------------------------------------------------------------------------- workers
def _preftune_config(args, work: Path, flags: list[str]):
    from preftune.cli import build_parser
    from preftune.cli.train import config_from_args

    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(args.fixture, args.bs * args.steps)))
    argv = ["dpo", "--model", str(args.model), "--data", str(data), "--output-dir", str(work / "run"),
            "--max-steps", str(args.steps), "--batch-size", str(args.bs), "--max-length", str(args.max_length),
            "--lr", "1e-6", "--beta", "0.1", "--device", args.device, "--seed", "0", "--quiet",
            "--scheduler", "linear", *(["--dtype", "float32"] if args.smoke else []), *flags]
    return config_from_args(build_parser().parse_args(argv), "dpo")


def _probes(flags: list[str]) -> list[str]:
    """Apply the `probe:` settings of a run (knobs under study, not CLI flags); return the other flags."""
    import torch

    for f in flags:
        if f == "probe:no-cudnn-sdp":
            torch.backends.cuda.enable_cudnn_sdp(False)
        elif f.startswith("probe:call-cost="):
            from preftune.logps import planner

            planner.CALL_COST_TOKENS["cuda"] = int(f.split("=")[1])
    return [f for f in flags if not f.startswith("probe:")]


def worker_preftune(args) -> dict:
    from preftune.training.loop import run

    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    atexit.register(shutil.rmtree, work, True)  # the run folders hold a model each
    run(_preftune_config(args, work, _probes(args.flags)), command="bench")
    steps = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "pairs_per_s" in s]
    times = [args.bs / s["pairs_per_s"] for s in steps]
    return {"step_s": times[1:] or times, "peak_mem_mb": _peak_mb(), "first_loss": steps[0]["loss"]}


def worker_profile(args) -> dict:
    """preftune's default step under torch.profiler: top operators by device time, and how busy the GPU was."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    import preftune.training.loop as train_mod
    from preftune.training.loop import run

    active = 3
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=acts, schedule=schedule(wait=2, warmup=1, active=active))
    inner, marks = train_mod.train_step, []

    def stepped(*a, **k):
        out = inner(*a, **k)
        _sync()
        marks.append(time.perf_counter())
        prof.step()
        return out

    train_mod.train_step = stepped
    work = Path(tempfile.mkdtemp(prefix="gpu-prof-"))
    atexit.register(shutil.rmtree, work, True)  # the run folders hold a model each
    args.steps = max(args.steps, 2 + 1 + active + 1)
    import warnings

    # Every host wait on the device inside the active steps, by the line that caused it.
    syncs: dict[str, int] = {}
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    with prof, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(_preftune_config(args, work, args.flags), command="bench")
    torch.cuda.set_sync_debug_mode(0) if torch.cuda.is_available() else None
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).name}:{w.lineno}"
            syncs[where] = syncs.get(where, 0) + 1
    wall = marks[2 + 1 + active - 1] - marks[2 + 1 - 1]  # the active steps (step() runs after each step)
    events = prof.key_averages()
    sort = "self_cpu_time_total"
    kernels: dict[str, float] = {}
    for e in prof.events():
        if torch.cuda.is_available() and e.device_type.name == "CUDA":
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us()
    if kernels:
        sort = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    try:
        table = events.table(sort_by=sort, row_limit=30, max_name_column_width=60)
    except Exception as e:  # the sort key's name moved between torch versions
        table = f"({e})\n" + events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:40]
    table += "\n\nkernels by total time over the active steps (us):\n" + "\n".join(f"{v:12.0f}  {k[:150]}" for k, v in top)
    steps_run = args.steps
    table += "\n\nhost waits on the device over the whole run of %d steps, by source line:\n" % steps_run
    table += "\n".join(f"{n:8d}  {k}" for k, n in sorted(syncs.items(), key=lambda kv: -kv[1])[:30])
    (args.out_dir / "profile.txt").write_text(table)
    busy = sum(kernels.values())
    mm = sum(v for k, v in kernels.items() if any(s in k.lower() for s in ("gemm", "nvjet", "cutlass", "xmma")))
    return {"active_steps": active, "wall_ms_per_step": 1e3 * wall / active,
            "host_waits_per_step": sum(syncs.values()) / steps_run,
            "gpu_busy_ms_per_step": busy / 1e3 / active, "matmul_ms_per_step": mm / 1e3 / active}


def worker_check(args) -> dict:
    """Fast log-prob paths against a whole-model forward on the GPU: fp32 (exact) and under bf16 autocast."""
    import torch

    from preftune.data.batching import collate
    from preftune.data.records import PreferencePair
    from preftune.data.tokenize import tokenize_all
    from preftune.logps.answer import answer_logps
    from preftune.logps.parts import set_compute_dtype
    from preftune.models.load import load_model, load_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from oracle import full_logits_logps  # the test suite's whole-model forward

    dev = torch.device(args.device)
    tok = load_tokenizer(str(args.model))
    rows = pair_rows(args.fixture, 16)
    items, _ = tokenize_all(tok, [PreferencePair(r["prompt"], r["chosen"], r["rejected"], None, "") for r in rows],
                            max_length=args.max_length)
    batch = collate(items, tok.pad_token_id).to(dev)
    model = load_model(str(args.model), device=dev, dtype=torch.float32)
    out = {}
    with torch.no_grad():
        ref = full_logits_logps(model, batch).logps.double()
        for share in (True, False):
            for trim in (True, False):
                got = answer_logps(model, batch, prefix_sharing=share, trim_padding=trim).logps.double()
                out[f"fp32 share={share} trim={trim}"] = float((got - ref).abs().max() / ref.abs().max())
        set_compute_dtype(model, torch.bfloat16)
        got = answer_logps(model, batch).logps.double()
        out["bf16 autocast defaults"] = float((got - ref).abs().max() / ref.abs().max())
    return out


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    _probes(args.flags)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    tok = AutoTokenizer.from_pretrained(args.model)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            _sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync()
            times.append(time.perf_counter() - self.t)

    extra = {"precompute_ref_log_probs": "precompute" in args.flags, "use_liger_kernel": "liger" in args.flags}
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.bs, max_steps=args.steps,
                    max_length=args.max_length, learning_rate=1e-6, beta=0.1, logging_steps=1, report_to=[],
                    bf16=not args.smoke, use_cpu=args.device == "cpu", save_strategy="no", lr_scheduler_type="linear",
                    gradient_checkpointing=False, dataloader_num_workers=0, seed=0, **extra)
    trainer = DPOTrainer(model=policy, ref_model=None if extra["precompute_ref_log_probs"] else ref, args=cfg,
                         processing_class=tok, callbacks=[StepTimer()],
                         train_dataset=Dataset.from_list(pair_rows(args.fixture, args.bs * args.steps)))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_s": times[1:] or times, "peak_mem_mb": _peak_mb(), "first_loss": losses[0]}


WORKERS = {"preftune": worker_preftune, "trl": worker_trl, "profile": worker_profile, "check": worker_check}


# ------------------------------------------------------------------------------------------- driver
def _spawn(args, mode: str, model: Path, max_length: int, flags: list[str], tag: str = "") -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--fixture", str(args.fixture), "--model", str(model),
           "--steps", str(args.steps), "--bs", str(args.bs), "--max-length", str(max_length),
           "--device", args.device, "--out-dir", str(args.out_dir), *(["--smoke"] if args.smoke else [])]
    cmd += [f"--flag={f}" for f in flags]
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"timed out after {args.run_timeout} s\n{(e.stderr or b'')[-2000:]!r}")
    if tag and out.stderr.strip():  # warnings, recompilations (TORCH_LOGS): kept beside the results
        (args.out_dir / f"stderr-{tag}.txt").write_text(out.stderr[-20000:])
    found = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not found:
        raise RuntimeError(f"exit {out.returncode}\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}")
    result = json.loads(found[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - t
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=Path, default=ROOT / "benchmarks" / "fixture" / "gpu")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--runs", default="", help="Comma-separated run ids (default: all): " + ",".join(RUNS))
    ap.add_argument("--run-timeout", type=int, default=150, help="Seconds one run may take.")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="Dense bf16 peak of the GPU (default: by name).")
    ap.add_argument("--skip-prelude", action="store_true", help="No GPU check or profile, only the runs.")
    ap.add_argument("--smoke", action="store_true", help="2 layers, CPU, fp32, 2 steps: checks the script.")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--max-length", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--flag", dest="flags", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.device, args.steps, args.bs, args.lengths = 2, "cpu", 3, 2, "512,600"
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    import torch

    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = (args.out_dir / "runs.jsonl").open("a")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    nominal = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), float("nan"))
    measured = matmul_rate("bfloat16", 8192, 10, "cuda") / 1e12 if torch.cuda.is_available() else float("nan")
    head = (f"{gpu}; torch {torch.__version__}; bf16 matmul 8192^3 measured {measured:.0f} TFLOP/s, nominal dense "
            f"peak {nominal:.0f}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(head, flush=True)
    model = build_model(args.fixture, Path(tempfile.gettempdir()) / f"qwen2-0.5b-shape-{args.layers}l", args.layers,
                        args.device)
    shape = Shape.of(json.loads((model / "config.json").read_text()))
    wanted = [x.strip() for x in args.runs.split(",") if x.strip()]
    if unknown := [x for x in wanted if x not in RUNS]:
        sys.exit(f"--runs: unknown run ids {unknown}; known: {', '.join(RUNS)}")
    lines = [head, ""]

    def record(name: str, length: int, result: dict) -> None:
        log.write(json.dumps({"name": name, "max_length": length, **result}) + "\n")
        log.flush()

    for mode in () if args.skip_prelude else ("check", "profile"):
        try:
            r = _spawn(args, mode, model, int(args.lengths.split(",")[0]), [])
            record(mode, int(args.lengths.split(",")[0]), r)
            print(mode, json.dumps(r), flush=True)
            lines.append(f"{mode}: {json.dumps(r)}")
        except RuntimeError as e:
            print(f"{mode}: failed: {e}", flush=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    work = {}
    for length in lengths:
        counts = token_lengths(model, pair_rows(args.fixture, args.bs * args.steps), length)
        work[length] = {t: mean_pair_flops(shape, counts, tool=t) for t in ("preftune", "trl")}
    rows: dict[int, dict[str, dict]] = {x: {} for x in lengths}
    text = "\n".join(lines)
    have_liger = importlib.util.find_spec("liger_kernel") is not None
    for run_id, length in plan(lengths, wanted):
        name, tool, flags = RUNS[run_id]
        if "liger" in flags and not have_liger:
            print(f"{name}: skipped (liger-kernel is not installed)", flush=True)
            continue
        try:
            r = _spawn(args, tool, model, length, flags, tag=f"{run_id}-{length}")
        except RuntimeError as e:
            print(f"{name} @ {length}: failed: {e}", flush=True)
            record(name, length, {"error": str(e)[-1500:]})
            continue
        steps = r.pop("step_s")
        r["pairs_per_s"] = args.bs / statistics.mean(steps)
        r["median_pairs_per_s"] = args.bs / statistics.median(steps)
        r["mfu_nominal"] = work[length][tool] * r["pairs_per_s"] / (nominal * 1e12)
        r["mfu_measured"] = work[length][tool] * r["pairs_per_s"] / (measured * 1e12)
        r["steps"] = steps
        rows[length][name] = r
        record(name, length, r)
        print(f"{name} @ {length}: {r['pairs_per_s']:.2f} pairs/s, {r['peak_mem_mb']:.0f} MB, "
              f"MFU {r['mfu_nominal']:.1%}, first loss {r['first_loss']:.6f}, {r['wall_s']:.0f} s", flush=True)
        text = "\n".join(lines + [t for x in lengths if rows[x] for t in _table(x, rows[x], work[x])]) + "\n"
        (args.out_dir / "table.md").write_text(text)
    print(text, flush=True)


def _table(length: int, rows: dict[str, dict], work: dict[str, float]) -> list[str]:
    best = max((r["pairs_per_s"] for n, r in rows.items() if n.startswith("TRL")), default=None)
    base_mem = rows.get(RUNS["trl"][0], {}).get("peak_mem_mb")
    out = ["", f"**max_length {length}** (useful GFLOP per pair: preftune {work['preftune'] / 1e9:.0f}, "
               f"TRL {work['trl'] / 1e9:.0f})", "",
           "| run | pairs/s | median | peak GPU MB | MFU (nominal) | MFU (measured peak) | first loss | "
           "vs TRL's best | memory vs TRL bf16 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        vs = f"{r['pairs_per_s'] / best:.2f}x" if best else "-"
        mem = f"{r['peak_mem_mb'] / base_mem:.2f}x" if base_mem else "-"
        out.append(f"| {name} | {r['pairs_per_s']:.2f} | {r['median_pairs_per_s']:.2f} | {r['peak_mem_mb']:.0f} "
                   f"| {r['mfu_nominal']:.1%} | {r['mfu_measured']:.1%} | {r['first_loss']:.6f} | {vs} | {mem} |")
    return out


if __name__ == "__main__":
    main()
