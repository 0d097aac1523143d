"""preftune kto against TRL's KTOTrainer on the shared benchmark fixture, back to back.

    python benchmarks/bench_kto.py [--fixture FX] [--steps 5] [--bs 8] [--out FILE.md]

FX is the fixture of bench_dpo.py (`../shared/bench/make_fixture.py`; built on the fly when missing). Its HH
pairs become unpaired feedback: pair i gives example 2i (chosen, desirable) and 2i+1 (rejected, undesirable);
pairs with an empty answer are left out. Both tools train on the same first `bs * (steps + 1)` examples: fp32,
2 threads, lr 1e-6, beta 0.1, AdamW, max_length 512, batch `bs` examples (each also runs its mismatched KL
answer, policy and reference). Every run is its own subprocess, so peak RSS is that run's alone. Speed is
`bs / mean(step time)` over the steps after the first. preftune's default settings run right before and right
after TRL, as two rows: the load of a shared machine drifts between them.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo import ROOT, ensure_fixture  # noqa: E402


def unpaired_rows(fixture: Path, n: int) -> list[dict]:
    rows = []
    for line in Path(fixture, "pairs.jsonl").read_text().splitlines():
        pair = json.loads(line)
        if not (pair["chosen"].strip() and pair["rejected"].strip()):
            continue
        rows += [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                 {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
        if len(rows) >= n:
            return rows[:n]
    return rows


def worker_preftune(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    from preftune.cli import build_parser
    from preftune.cli.train import config_from_args
    from preftune.training.loop import run

    work = Path(tempfile.mkdtemp(prefix="bench-kto-"))
    atexit.register(shutil.rmtree, work, True)  # the run folders hold a model each
    data = work / "unpaired.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in unpaired_rows(Path(args.fixture), args.bs * (args.steps + 1))))
    argv = ["kto", "--model", str(Path(args.fixture, "model")), "--data", str(data), "--output-dir", str(work / "run"),
            "--max-steps", str(args.steps), "--batch-size", str(args.bs), "--max-length", str(args.max_length),
            "--lr", "1e-6", "--beta", "0.1", "--dtype", "float32", "--device", "cpu", "--scheduler", "linear",
            "--seed", "0", "--quiet", *args.flags]
    run(config_from_args(build_parser().parse_args(argv), "kto"), command="bench")
    steps = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "samples_per_s" in s]
    times = [args.bs / s["samples_per_s"] for s in steps]
    print("RESULT " + json.dumps({"steady_step_s": times[1:] or times,
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "first_loss": steps[0]["loss"], "first_kl": steps[0]["kl"]}), flush=True)


def worker_trl(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model_dir = os.path.join(args.fixture, "model")
    rows = unpaired_rows(Path(args.fixture), args.bs * (args.steps + 1))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    cfg = KTOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.bs, max_steps=args.steps,
                    max_length=args.max_length, learning_rate=1e-6, beta=0.1, logging_steps=1, report_to=[],
                    gradient_checkpointing=False, bf16=False, use_cpu=True, save_strategy="no",
                    dataloader_num_workers=0, seed=0, lr_scheduler_type="linear")
    trainer = KTOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[Timer()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    print("RESULT " + json.dumps({"steady_step_s": times[1:] or times,
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "first_loss": logs[0]["loss"], "first_kl": logs[0].get("kl", float("nan"))}),
          flush=True)


def _sub(args, mode: str, flags: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--fixture", str(args.fixture), "--steps", str(args.steps),
           "--bs", str(args.bs), "--max-length", str(args.max_length), "--threads", str(args.threads)]
    cmd += [f"--flag={f}" for f in flags]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise RuntimeError(f"{mode} {flags}: failed\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    r = json.loads(line[-1][len("RESULT "):])
    steady = r.pop("steady_step_s")
    r["samples_per_s"] = args.bs / statistics.mean(steady)
    r["median_samples_per_s"] = args.bs / statistics.median(steady)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="/tmp/preftune-bench/base")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="", help="Also write the table (markdown) here.")
    ap.add_argument("--worker", choices=["preftune", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--flag", dest="flags", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "preftune":
        return worker_preftune(args)
    if args.worker == "trl":
        return worker_trl(args)
    args.fixture = ensure_fixture(Path(args.fixture))
    started = time.strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()[0]
    rows = [("preftune kto (default settings), run before TRL", _sub(args, "preftune")),
            ("TRL KTOTrainer", _sub(args, "trl")),
            ("preftune kto (default settings), run after TRL", _sub(args, "preftune"))]
    load_after = os.getloadavg()[0]
    trl = rows[1][1]
    lines = [f"Measured {started} on {os.cpu_count()} cores ({platform.machine()}), {args.threads} threads; "
             f"{args.steps} steps per run, batch {args.bs} examples, max_length {args.max_length}, fp32. "
             f"1-minute load average {load_before:.1f} before and {load_after:.1f} after (the runs' own {args.threads} "
             "threads count toward it).", "",
             "| run | examples/s | median examples/s | peak RSS MB | first loss | first KL | speed vs TRL | RSS vs TRL |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows:
        lines.append(f"| {name} | {r['samples_per_s']:.2f} | {r['median_samples_per_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['first_loss']:.6f} | {r['first_kl']:.4f} | {r['samples_per_s'] / trl['samples_per_s']:.2f}x | "
                     f"{r['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
