"""Time from start to the first training step on a big file: preftune (cold and warm token cache) beside TRL's
DPOTrainer (cold and warm HF datasets cache), on the same pairs.

    python benchmarks/bench_first_step.py --fixture FX [--pairs 200000] [--work DIR] [--out FILE.md]

FX is the shared benchmark fixture (bench_dpo.py builds it when missing). The data file is the fixture's HH pairs
repeated to `--pairs` records, copy k > 0 with "(k)" after the first "Human:" so no two prompts of different
copies are equal; pairs with an empty answer are left out (preftune refuses them, TRL takes them). It is written
under --work, outside the repository. Each run is its own process; the clock starts just before the process
starts (so imports, loading the data, tokenising and loading the model all count) and stops when the first
optimizer step begins. "cold" runs start with an empty cache folder, "warm" runs reuse the one the cold run
wrote. TRL reads the file with `datasets.load_dataset("json", ...)`, which caches the arrow table and every map.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo import ensure_fixture  # noqa: E402

FIRST_STEP = "first_step_at="


def build_file(fixture: Path, n: int, out: Path) -> Path:
    if out.is_file() and sum(1 for _ in open(out)) == n:
        return out
    rows = [r for r in map(json.loads, open(fixture / "pairs.jsonl")) if r["chosen"].strip() and r["rejected"].strip()]
    with open(out, "w") as handle:
        for i in range(n):
            row, copy = dict(rows[i % len(rows)]), i // len(rows)
            if copy:
                row["prompt"] = row["prompt"].replace("Human: ", f"Human: ({copy}) ", 1)
            handle.write(json.dumps(row) + "\n")
    return out


# ------------------------------------------------------------------------------------------- worker processes
def worker_preftune(args) -> None:
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, str(ROOT / "src"))
    from preftune.cli import main
    from preftune.training import loop

    def first_step(*a, **k):
        print(f"{FIRST_STEP}{time.time()}", flush=True)
        os._exit(0)

    loop.train_step = first_step
    run_dir = tempfile.mkdtemp(prefix="first-step-", dir=Path(args.cache).parent)
    argv = ["dpo", "--model", str(Path(args.fixture, "model")), "--data", args.data, "--output-dir", run_dir,
            "--max-steps", "1", "--batch-size", "8", "--max-length", "512",
            "--lr", "1e-6", "--dtype", "float32", "--device", "cpu", "--token-cache-dir", args.cache, *args.extra]
    sys.exit(main(argv))


def worker_trl(args) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(2)

    class FirstStep(TrainerCallback):
        def on_step_begin(self, *a, **k):
            print(f"{FIRST_STEP}{time.time()}", flush=True)
            os._exit(0)

    model_dir = os.path.join(args.fixture, "model")
    ds = load_dataset("json", data_files=args.data, split="train")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    run_dir = tempfile.mkdtemp(prefix="first-step-trl-", dir=Path(args.cache).parent)
    cfg = DPOConfig(output_dir=run_dir, per_device_train_batch_size=8,
                    max_steps=1, max_length=512, learning_rate=1e-6, beta=0.1, report_to=[], bf16=False,
                    use_cpu=True, save_strategy="no", dataloader_num_workers=0, seed=0)
    DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok,
               callbacks=[FirstStep()]).train()
    sys.exit("TRL finished without starting a step")


# ------------------------------------------------------------------------------------------------- driver
def timed(mode: str, args, cache: Path, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--fixture", str(args.fixture), "--data", str(args.data),
           "--cache", str(cache), *[f"--extra={e}" for e in extra]]
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.communicate()
    stamps = [float(line[len(FIRST_STEP):]) for line in stdout.splitlines() if line.startswith(FIRST_STEP)]
    if not stamps:
        raise RuntimeError(f"{mode} {extra}: no first step\n{stdout[-2000:]}\n{stderr[-3000:]}")
    notes = [line for line in stdout.splitlines() if line.startswith("tokenized data:")]
    return {"seconds": stamps[0] - start, "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", default="/tmp/preftune-bench/base")
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "preftune-first-step"))
    ap.add_argument("--out")
    ap.add_argument("--runs", default="preftune,serial,trl",
                    help="Which runs, comma-separated: preftune (cold, then warm), serial (cold, one process), trl "
                         "(cold, then warm).")
    ap.add_argument("--worker"), ap.add_argument("--data"), ap.add_argument("--cache")
    ap.add_argument("--extra", action="append", default=[])
    args = ap.parse_args()
    if args.worker:
        return (worker_preftune if args.worker == "preftune" else worker_trl)(args)
    args.fixture = ensure_fixture(Path(args.fixture))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.data = build_file(args.fixture, args.pairs, work / f"pairs-{args.pairs}.jsonl")
    rows = []

    def run(name: str, mode: str, cache: Path, extra=()):
        result = timed(mode, args, cache, list(extra))
        rows.append((name, result))
        print(f"{name}: {result['seconds']:.1f}s {' '.join(result['notes'])}", flush=True)

    stamp, runs = time.strftime("%H%M%S"), args.runs.split(",")
    if "preftune" in runs:
        cache = work / f"preftune-cache-{stamp}"
        run("preftune, cold cache (auto processes)", "preftune", cache)
        run("preftune, warm cache", "preftune", cache)
    if "serial" in runs:
        run("preftune, cold cache, --tokenize-procs 1", "preftune", work / f"preftune-serial-{stamp}",
            ["--tokenize-procs", "1"])
    if "trl" in runs:
        trl_cache = work / f"hf-datasets-{stamp}"
        run("TRL DPOTrainer, cold datasets cache", "trl", trl_cache)
        run("TRL DPOTrainer, warm datasets cache", "trl", trl_cache)
    lines = [f"| run ({args.pairs:,} pairs) | seconds to the first step |", "| --- | ---: |"]
    lines += [f"| {name} | {r['seconds']:.1f} |" for name, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
