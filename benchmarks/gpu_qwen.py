"""preftune and TRL's DPOTrainer on one GPU with a Qwen2-0.5B-shaped random model, HH data, bf16.

    python benchmarks/gpu_qwen.py --fixture FX [--steps 12] [--out benchmarks/results/gpu-qwen.md]

FX is the shared benchmark fixture (its tokenizer and HH pairs are used; built when missing). The model has
Qwen2-0.5B's shape: vocab 151,936, hidden 896, intermediate 4,864, 24 layers, 14 heads, 2 KV heads, tied
embeddings; random weights (seed 0), stored in bf16. Both runs: bf16 weights, batch 8, max_length 1024, lr 1e-6,
beta 0.1, AdamW, no gradient checkpointing, each in its own subprocess.

Reported: pairs/s (batch / mean step time after the first), peak GPU memory (torch.cuda.max_memory_allocated),
and MFU as DPO-equivalent model FLOPs per second over the GPU's dense bf16 peak. DPO-equivalent FLOPs per pair
are 8 * N * (2 * prompt + chosen + rejected): forward+backward (6N per token) of the policy and a forward (2N)
of the reference over the tokens a plain DPO step computes, N counting every matmul weight (the tied output
projection included, the embedding lookup not). preftune computes fewer tokens than that (the prompt once,
answer-only logits), so its figure says how fast it gets through the same work, and may exceed what the chip did.
`--smoke` runs a 2-layer version on the CPU for a few steps to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo import ensure_fixture  # noqa: E402

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1_000_000.0, tie_word_embeddings=True)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def build_model(fixture: Path, out: Path, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(fixture / "model")
    torch.manual_seed(0)
    cfg = Qwen2Config(**{**QWEN2_05B, "num_hidden_layers": layers}, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def matmul_params(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o, k, v, gate/up/down
    return layers * per_layer + cfg["vocab_size"] * h


def pair_rows(fixture: Path, n: int) -> list[dict]:
    return [json.loads(x) for x in (fixture / "pairs.jsonl").read_text().splitlines()[:n]]


def plain_tokens(model_dir: Path, rows: list[dict], max_length: int) -> float:
    """Mean 2 * prompt + chosen + rejected tokens per pair, after preftune's (= TRL's) truncation."""
    sys.path.insert(0, str(ROOT / "src"))
    from preftune.data.records import PreferencePair
    from preftune.data.tokenize import tokenize_all
    from preftune.models import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    items, _ = tokenize_all(tok, [PreferencePair(r["prompt"], r["chosen"], r["rejected"], None, "") for r in rows],
                            max_length=max_length)
    return statistics.mean(2 * len(i.prompt_ids) + len(i.chosen_ids) + len(i.rejected_ids) for i in items)


# ------------------------------------------------------------------------------------------- workers
def worker_preftune(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from preftune.config import TrainConfig
    from preftune.train import run

    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(args.fixture, args.bs * (args.steps + 1))))
    cfg = TrainConfig(stage="dpo", model=str(args.model), data=str(data), output_dir=str(work / "run"),
                      max_steps=args.steps, batch_size=args.bs, max_length=args.max_length, lr=1e-6, beta=0.1,
                      dtype=args.dtype, device=args.device, seed=0, quiet=True, scheduler="linear",
                      compile=args.compile, skip_bad_records=True)  # HH has a few empty answers
    run(cfg, command="bench")
    steps = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    times = [args.bs / s["pairs_per_s"] for s in steps if "pairs_per_s" in s]
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    return {"step_s": statistics.mean(times[1:] or times), "peak_mem_mb": peak, "first_loss": steps[0]["loss"]}


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    tok = AutoTokenizer.from_pretrained(args.model)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.bs, max_steps=args.steps,
                    max_length=args.max_length, learning_rate=1e-6, beta=0.1, logging_steps=1, report_to=[],
                    bf16=args.dtype == "bfloat16", use_cpu=args.device == "cpu", save_strategy="no",
                    gradient_checkpointing=False, dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=cfg, processing_class=tok, callbacks=[StepTimer()],
                         train_dataset=Dataset.from_list(pair_rows(args.fixture, args.bs * (args.steps + 1))))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    return {"step_s": statistics.mean(times[1:] or times), "peak_mem_mb": peak, "first_loss": losses[0]}


# ------------------------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=Path, default=Path("/tmp/preftune-bench/base"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--compile", action="store_true", help="Also time preftune with --compile.")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="Dense bf16 peak of the GPU (default: by name).")
    ap.add_argument("--smoke", action="store_true", help="2 layers, CPU, fp32, 2 steps: checks the script.")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu-qwen.md")
    ap.add_argument("--worker", choices=["preftune", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.device, args.dtype, args.steps, args.max_length, args.bs = 2, "cpu", "float32", 2, 128, 2
    if args.worker:
        result = (worker_preftune if args.worker == "preftune" else worker_trl)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    fixture = ensure_fixture(args.fixture)
    model = build_model(fixture, Path(tempfile.gettempdir()) / f"qwen2-0.5b-shape-{args.layers}l", args.layers)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), float("nan"))
    rows = pair_rows(fixture, args.bs * (args.steps + 1))
    work_per_pair = 8 * matmul_params(model) * plain_tokens(model, rows, args.max_length)
    runs = [("preftune (default settings)", "preftune", [])]
    runs += [("preftune --compile", "preftune", ["--compile"])] if args.compile else []
    runs += [] if args.skip_trl else [("TRL DPOTrainer", "trl", [])]
    results = {}
    for name, mode, extra in runs:
        cmd = [sys.executable, __file__, "--worker", mode, "--fixture", str(fixture), "--model", str(model),
               "--steps", str(args.steps), "--bs", str(args.bs), "--max-length", str(args.max_length),
               "--dtype", args.dtype, "--device", args.device, *extra]
        out = subprocess.run(cmd, capture_output=True, text=True)
        found = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not found:
            print(f"{name}: failed\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(found[-1][7:])
        r["pairs_per_s"] = args.bs / r["step_s"]
        r["mfu"] = work_per_pair * r["pairs_per_s"] / (peak * 1e12)
        results[name] = r
        print(name, r, flush=True)
    base = results.get("TRL DPOTrainer")
    lines = [f"{gpu}; Qwen2-0.5B shape ({args.layers} layers), {args.dtype}, batch {args.bs}, max_length "
             f"{args.max_length}, {args.steps} steps; measured {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "| run | pairs/s | peak GPU memory MB | MFU (DPO-equivalent) | first loss | speed vs TRL | memory vs TRL |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        vs = (f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x | {r['peak_mem_mb'] / base['peak_mem_mb']:.2f}x"
              if base else "- | -")
        lines.append(f"| {name} | {r['pairs_per_s']:.2f} | {r['peak_mem_mb']:.0f} | {r['mfu']:.1%} | "
                     f"{r['first_loss']:.6f} | {vs} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
