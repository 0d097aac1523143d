"""The fused RMS norms (models/fused.py) against Hugging Face's, measured side by side on a shared machine.

    python benchmarks/bench_fused.py [--fixture FX] [--threads 2] [--iters 6] [--out FILE.md]

Two measurements, each alternating the two forms so that a drifting load falls on both alike:
1. the norm alone on `[tokens, hidden]` float32 inputs: Hugging Face's LlamaRMSNorm formula (autograd backward),
   `torch.nn.functional.rms_norm` (autograd backward) and models/fused.rms_norm, forward and forward+backward;
2. the fixture's work without the optimizer: the policy's answer log-probs forward and backward plus the frozen
   reference's forward (prefix sharing, trimmed padding, as a default run), on the same 3 batches of 8 pairs,
   with the norms of both models fused or plain in alternate iterations.
Reported: medians of wall time and of process CPU time (with 1 thread CPU time is the work done whatever the
machine's load; with 2 threads wall time includes the waits of each parallel operator for a busy core), and the
number of operators a batch runs. `uptime` before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from preftune.models.fused import rms_norm, use_fused_norms, use_plain_norms  # noqa: E402

EPS = 1e-6


def _hf(x, w):
    """LlamaRMSNorm.forward's arithmetic (its float32 upcast is a no-op on float32 input)."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


FORMS = {"Hugging Face": _hf, "F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
         "fused (this)": lambda x, w: rms_norm(x, w, EPS)}


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def norm_alone(tokens: int, hidden: int, reps: int) -> list[tuple]:
    torch.manual_seed(0)
    x0, g = torch.randn(tokens, hidden), torch.randn(tokens, hidden)
    w = torch.randn(hidden, requires_grad=True)
    rows = []
    for backward in (False, True):
        times = {k: [] for k in FORMS}
        for _ in range(reps):
            for name, form in FORMS.items():
                x = x0.clone().requires_grad_()

                def once():
                    y = form(x, w)
                    if backward:
                        torch.autograd.backward(y, g)
                times[name].append(_timed(once)[0])
                w.grad = None
        base = statistics.median(times["Hugging Face"])
        for name in FORMS:
            med = statistics.median(times[name])
            rows.append((f"[{tokens}, {hidden}]", "forward + backward" if backward else "forward", name,
                         med * 1e6, base / med))
    return rows


def fixture_step(fixture: Path, iters: int):
    from preftune.data.batching import collate
    from preftune.data.records import PreferencePair
    from preftune.data.tokenize import tokenize_all
    from preftune.logps.answer import answer_logps
    from preftune.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(fixture / "model"))
    policy = load_model(str(fixture / "model"), device=torch.device("cpu"), dtype=torch.float32)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rows = [json.loads(x) for x in (fixture / "pairs.jsonl").read_text().splitlines()[:40]]
    items, _ = tokenize_all(tok, [PreferencePair(r["prompt"], r["chosen"], r["rejected"], None, "") for r in rows
                                  if r["chosen"].strip() and r["rejected"].strip()], max_length=512)
    batches = [collate(items[i:i + 8], tok.pad_token_id) for i in range(0, 24, 8)]

    def work():
        for b in batches:
            policy.zero_grad(set_to_none=True)
            with torch.no_grad():
                ref = answer_logps(reference, b).logps
            (answer_logps(policy, b).logps - ref).sum().backward()

    def use(name):
        for m in (policy, reference):
            (use_fused_norms if name == "fused" else use_plain_norms)(m)

    ops = {}
    for name in ("plain", "fused"):
        use(name)
        work()  # warm-up, and the operator count of one pass
        with torch.profiler.profile() as prof:
            work()
        ops[name] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / len(batches)
    wall, cpu = {"plain": [], "fused": []}, {"plain": [], "fused": []}
    for i in range(iters):
        for name in (("plain", "fused") if i % 2 == 0 else ("fused", "plain")):
            use(name)
            w, c = _timed(work)
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu, ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="/tmp/preftune-bench/base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    uptime = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    lines = [f"torch {torch.__version__}, {args.threads} threads.", "",
             "| input | pass | form | median us | Hugging Face / form |", "| --- | --- | --- | ---: | ---: |"]
    for tokens, hidden in ((64, 256), (1024, 256), (2048, 896)):
        for shape, kind, name, us, ratio in norm_alone(tokens, hidden, args.reps):
            lines.append(f"| {shape} | {kind} | {name} | {us:.0f} | {ratio:.2f}x |")
    wall, cpu, ops = fixture_step(Path(args.fixture), args.iters)
    lines += ["", f"Fixture `{args.fixture}`: policy forward + backward and reference forward on 3 batches of 8 "
              f"pairs, {args.iters} alternating iterations per form.", "",
              "| norms | median wall s | median CPU s | aten operators per batch |", "| --- | ---: | ---: | ---: |"]
    for name in ("plain", "fused"):
        lines.append(f"| {name} | {statistics.median(wall[name]):.3f} | {statistics.median(cpu[name]):.3f} | "
                     f"{ops[name]:.0f} |")
    ratio = [p / f for p, f in zip(wall["plain"], wall["fused"])]
    cratio = [p / f for p, f in zip(cpu["plain"], cpu["fused"])]
    lines += ["", f"plain / fused, per iteration pair: wall median {statistics.median(ratio):.3f} "
              f"(range {min(ratio):.3f}-{max(ratio):.3f}), CPU median {statistics.median(cratio):.3f} "
              f"(range {min(cratio):.3f}-{max(cratio):.3f})."]
    uptime.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    lines += ["", f"Load before: `{uptime[0]}`; after: `{uptime[1]}`."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
