"""The least resident memory any run computing preftune's fp32 numbers needs, beside TRL's peak and the target.

    python benchmarks/memory_floor.py [--fixture FX] [--vocab-fixture FX152] [--steps 3]

Issue 18 set a peak-RSS target as a fraction of TRL's (0.15x at vocab 32,000 and batch 8, 0.35x at vocab
151,936 and batch 2). This script builds, in a fresh process per fixture and with plain `transformers` and
`torch` rather than preftune, only the state that the same numbers require before a step runs, and reads
`/proc/self/status` after each addition:

1. the interpreter with torch, and a tokenizer and a config loaded through transformers (what any run imports);
2. the policy's fp32 weights, in memory of its own (training writes them);
3. the reference's fp32 weights without its input embedding (a lookup needs only the rows the data uses);
4. AdamW's two fp32 moments of every policy matrix except the input embedding (its rows update sparsely);
5. the output matrix's gradient, which AdamW after gradient-norm clipping needs whole before it updates.

Nothing of a step is counted: no activations, no logits, no data, no gradient but the head's, no allocator
slack. The sum is a lower bound; TRL's peak and preftune's (default settings) are measured in the same invocation
by the runs of `bench_dpo.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo import _sub, ensure_fixture, fixture_parser, run_trl  # noqa: E402

TARGETS = {32000: 0.15, 151936: 0.35}  # issue 18's fractions of TRL's peak RSS
STAGES = ["interpreter, torch, transformers, tokenizer", "+ policy weights (fp32)",
          "+ reference weights but the input embedding (fp32)", "+ AdamW moments (all but the input embedding)",
          "+ output-matrix gradient"]


def _rss_mb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker(model_dir: str, threads: int) -> None:
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    AutoTokenizer.from_pretrained(model_dir)
    AutoConfig.from_pretrained(model_dir)
    rss = [_rss_mb()]

    def private(model):  # the weights in memory of the process's own, not pages of the mapped file
        for p in model.parameters():
            p.data = p.data.clone()
        gc.collect()
        return model

    policy = private(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    rss.append(_rss_mb())
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref.get_input_embeddings().weight = None
    private(ref)
    rss.append(_rss_mb())
    embed = policy.get_input_embeddings().weight
    moments = [torch.zeros_like(p) for p in policy.parameters() if p is not embed for _ in range(2)]
    rss.append(_rss_mb())
    head = policy.get_output_embeddings().weight
    head.grad = torch.ones_like(head)
    rss.append(_rss_mb())
    vocab = policy.config.get_text_config().vocab_size
    print("RESULT " + json.dumps({"rss": rss, "vocab": vocab, "moments": len(moments)}), flush=True)


def measure(args, fixture: Path, bs: int) -> str:
    cmd = [sys.executable, __file__, "--worker", str(fixture / "model"), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise RuntimeError(f"floor worker failed\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    floor = json.loads(line[-1][len("RESULT "):])
    runs = argparse.Namespace(steps=args.steps, max_length=512, threads=args.threads)
    trl = run_trl(runs, fixture, bs)
    ours = _sub(runs, "preftune", fixture, bs, [])
    lines = [f"**vocab {floor['vocab']:,}, batch {bs}**", "", "| resident memory | MB | vs TRL's peak |",
             "| --- | ---: | ---: |"]
    trl_mb = trl["peak_rss_mb"] if trl else None

    def row(name, mb):
        return f"| {name} | {mb:,.0f} | {mb / trl_mb:.2f}x |" if trl_mb else f"| {name} | {mb:,.0f} | - |"

    lines += [row(name, mb) for name, mb in zip(STAGES, floor["rss"])]
    if trl_mb:
        lines.append(row("TRL DPOTrainer, peak", trl_mb))
    lines.append(row("preftune, default settings, peak", ours["peak_rss_mb"]))
    target = TARGETS.get(floor["vocab"])
    if trl_mb and target:
        lines.append(row(f"issue 18's target ({target}x TRL)", target * trl_mb))
    return "\n".join(lines)


def main() -> None:
    ap = fixture_parser(__doc__)
    ap.add_argument("--steps", type=int, default=3, help="Steps of the TRL and preftune runs.")
    ap.add_argument("--out", default="", help="Also write the tables (markdown) here.")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.threads)
    sections = [measure(args, ensure_fixture(Path(args.fixture)), 8)]
    if args.vocab_fixture:
        sections.append(measure(args, ensure_fixture(Path(args.vocab_fixture), vocab=151936), 2))
    text = "\n\n".join(sections)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
