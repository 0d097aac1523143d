"""What autograd keeps between a policy's forward and its backward, with the gated MLPs plain or fused.

    python benchmarks/saved_activations.py [--fixture FX] [--threads 2] [--iters 6] [--out FILE.md]

The tensors kept for backward are what a GPU's caching allocator must hold at a step's peak besides weights,
gradients and optimizer state; on a CPU, glibc's heap keeps freed blocks as holes and the process's peak RSS
moves by noise around such a change. So this counts them exactly: every tensor autograd saves during the
policy's answer log-probs forward (`torch.autograd.graph.saved_tensors_hooks`), by distinct storage, weights
left out. Two models, each on the fixture's first 3 batches of 8 pairs (default layout):
1. the fixture's Llama (hidden 256, intermediate 682, 4 layers), float32, as the CPU benchmark runs it;
2. Qwen2-0.5B's shape (hidden 896, intermediate 4,864, 14 heads, 2 key/value heads, vocabulary 151,936) with
   2 of its 24 layers, under bf16 autocast as on a GPU; per layer and scaled to 24 layers. Its layout is the
   CPU's (packed rows); a GPU pads, so there the tokens kept per batch, and the saving, are larger.
Also the forward+backward wall time of each form (median of alternating iterations). `uptime` before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from preftune.models.fused_mlp import use_fused_mlps, use_plain_mlps  # noqa: E402

FORMS = ("plain", "fused")


def _batches(fixture: Path):
    from preftune.data.batching import collate
    from preftune.data.records import PreferencePair
    from preftune.data.tokenize import tokenize_all
    from preftune.models.load import load_tokenizer

    tok = load_tokenizer(str(fixture / "model"))
    rows = [json.loads(x) for x in (fixture / "pairs.jsonl").read_text().splitlines()[:40]]
    items, _ = tokenize_all(tok, [PreferencePair(r["prompt"], r["chosen"], r["rejected"], None, "") for r in rows
                                  if r["chosen"].strip() and r["rejected"].strip()], max_length=512)
    return [collate(items[i:i + 8], tok.pad_token_id) for i in range(0, 24, 8)]


def _kept_bytes(model, batch, amp) -> int:
    """Bytes of the distinct storages autograd saves in one forward, the model's own weights left out."""
    from preftune.logps.answer import answer_logps

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with amp, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = answer_logps(model, batch).logps.sum()
    del out
    return sum(kept.values())


def _time(model, batches, amp) -> float:
    from preftune.logps.answer import answer_logps

    start = time.perf_counter()
    for b in batches:
        model.zero_grad(set_to_none=True)
        with amp:
            out = answer_logps(model, b).logps.sum()
        out.backward()
    return time.perf_counter() - start


def _use(model, form: str) -> None:
    (use_fused_mlps if form == "fused" else use_plain_mlps)(model)


def measure(model, batches, amp, iters: int) -> dict:
    result = {}
    for form in FORMS:
        _use(model, form)
        result[form] = {"kept_mb": statistics.mean(_kept_bytes(model, b, amp) for b in batches) / 2 ** 20}
    times = {form: [] for form in FORMS}
    for i in range(iters + 1):
        for form in (FORMS if i % 2 == 0 else FORMS[::-1]):
            _use(model, form)
            t = _time(model, batches, amp)
            if i:  # the first round warms up
                times[form].append(t / len(batches))
    for form in FORMS:
        result[form]["step_s"] = statistics.median(times[form])
    use_plain_mlps(model)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="/tmp/preftune-bench/base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, Qwen2Config

    from preftune.logps.parts import set_compute_dtype
    from preftune.models.load import load_model

    fixture = Path(args.fixture)
    uptime = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    batches = _batches(fixture)
    rows = []
    llama = load_model(str(fixture / "model"), device=torch.device("cpu"), dtype=torch.float32)
    rows.append(("fixture Llama, 4 layers, fp32", 1, measure(llama, batches, nullcontext(), args.iters)))
    del llama
    torch.manual_seed(0)
    qwen = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2, num_attention_heads=14,
        num_key_value_heads=2, tie_word_embeddings=True, use_cache=False))
    set_compute_dtype(qwen, torch.bfloat16)  # bf16 autocast, as a run sets it up (and its layout probe reads)
    rows.append(("Qwen2-0.5B shape, 2 of 24 layers, bf16 autocast", 12,
                 measure(qwen, batches, nullcontext(), max(2, args.iters // 3))))
    uptime.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M')}; {args.threads} threads; 3 fixture batches of 8 pairs.",
             f"uptime before: {uptime[0]}", f"uptime after: {uptime[1]}", "",
             "| model | kept for backward, plain MLPs | fused MLPs | fused / plain | 24 layers: saved | "
             "step s, plain | step s, fused |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, scale, r in rows:
        plain, fused = r["plain"]["kept_mb"], r["fused"]["kept_mb"]
        saved = f"{(plain - fused) * scale:,.0f} MB" if scale > 1 else "-"
        lines.append(f"| {name} | {plain:,.1f} MB | {fused:,.1f} MB | {fused / plain:.2f} | {saved} | "
                     f"{r['plain']['step_s']:.3f} | {r['fused']['step_s']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
