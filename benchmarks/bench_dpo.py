"""preftune against TRL's DPOTrainer on the shared benchmark fixture, in one invocation, back to back.

    python benchmarks/bench_dpo.py --fixture FX [--steps 10] [--vocab-fixture FX152] [--out FILE.md]

FX is a folder written by `../shared/bench/make_fixture.py FX ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz`
(built here on the fly when missing and the shared script is found). Every measured run is its own subprocess,
so peak RSS is that run's alone. All runs: same first `batch * (steps + 1)` pairs, fp32, 2 threads, lr 1e-6,
beta 0.1, AdamW, max_length 512. Speed is `batch / mean(step time)` over the steps after the first, the formula
of the shared TRL script; the median step is shown beside it for preftune. preftune's default settings run
right before and right after TRL, as two rows: the load of a shared machine drifts between them.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import Shape, matmul_rate, mean_pair_flops  # noqa: E402

HH = "data/hh-rlhf-harmless-base-test.jsonl.gz"

# name -> preftune flags; each row adds one idea to the row above it.
VARIANTS = {
    "plain rows (padded batch), answer-only chunked logits": ["--no-prefix-sharing", "--no-trim-padding"],
    "+ padding trimmed (length groups inside the batch)": ["--no-prefix-sharing"],
    "+ prefix sharing (padded length groups)": ["--no-packing"],
    "+ packed rows, no padding (default settings)": [],
    "+ reference log-probs cached (--precompute-ref, reused)": ["--precompute-ref"],
}


def shared_dir() -> Path | None:
    for base in (ROOT.parent, ROOT.parent.parent):
        if (base / "shared" / "bench" / "make_fixture.py").is_file():
            return base / "shared"
    return None


def ensure_fixture(path: Path, vocab: int | None = None) -> Path:
    if (path / "pairs.jsonl").is_file() and (path / "model" / "config.json").is_file():
        return path
    shared = shared_dir()
    if shared is None:
        sys.exit(f"{path}: no fixture there, and ../shared/bench/make_fixture.py was not found to build one")
    cmd = [sys.executable, str(shared / "bench" / "make_fixture.py"), str(path), str(shared / HH)]
    cmd += ["--vocab", str(vocab)] if vocab else []
    print("building fixture:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return path


# ------------------------------------------------------------------------------------------- worker processes
def worker_preftune(args) -> None:
    """One preftune run in this process; prints a JSON line with its numbers."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    from preftune.cli import build_parser
    from preftune.cli.train import config_from_args
    from preftune.training.loop import run

    rows = Path(args.fixture, "pairs.jsonl").read_text().splitlines()[: args.bs * (args.steps + 1)]
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    atexit.register(shutil.rmtree, work, True)  # the run folders hold a model each
    data = work / "pairs.jsonl"
    data.write_text("\n".join(rows) + "\n")
    argv = ["dpo", "--model", str(Path(args.fixture, "model")), "--data", str(data), "--output-dir",
            str(work / "run"), "--max-steps", str(args.steps), "--batch-size", str(args.bs), "--max-length",
            str(args.max_length), "--lr", "1e-6", "--beta", "0.1", "--dtype", "float32", "--device", "cpu",
            "--scheduler", "linear", "--seed", "0", "--quiet",
            "--skip-bad-records", *args.flags]  # HH has a few empty answers, which TRL trains on as bare EOS
    cfg = config_from_args(build_parser().parse_args(argv), "dpo")
    run(cfg, command="bench")
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "pairs_per_s" in s]
    times = [args.bs / s["pairs_per_s"] for s in steps]
    steady = times[1:] or times
    print("RESULT " + json.dumps({
        "steady_step_s": steady,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_per_step": statistics.mean(s["tokens_per_s"] / s["pairs_per_s"] * args.bs for s in steps),
        "first_loss": steps[0]["loss"],
    }), flush=True)


def worker_check(args) -> None:
    """Token ids against TRL's rule, and our summed answer log-probs against a direct forward of those ids."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    from preftune.data.batching import collate
    from preftune.data.records import PreferencePair
    from preftune.data.tokenize import tokenize_pair
    from preftune.logps.answer import answer_logps
    from preftune.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(Path(args.fixture, "model")))
    model = load_model(str(Path(args.fixture, "model")), device=torch.device("cpu"), dtype=torch.float32).eval()
    rows = [json.loads(x) for x in Path(args.fixture, "pairs.jsonl").read_text().splitlines()[: args.check_pairs]]
    same, worst, items, trl_ids = 0, 0.0, [], []
    for i, r in enumerate(rows):
        item = tokenize_pair(tok, PreferencePair(r["prompt"], r["chosen"], r["rejected"], None, ""),
                             max_length=args.max_length, index=i)
        prompt = tok(r["prompt"])["input_ids"]
        full = [tok(r["prompt"] + r[a] + tok.eos_token)["input_ids"] for a in ("chosen", "rejected")]
        cut = min(_common_prefix(prompt, f) for f in full)
        if len(prompt[:cut]) >= args.max_length:
            continue  # both drop a pair whose prompt fills max_length
        full = [f[: args.max_length] for f in full]  # TRL keeps the start of prompt+answer
        expected = (prompt[:cut], full[0][cut:], full[1][cut:])
        if item is None:
            continue
        same += (item.prompt_ids, item.chosen_ids, item.rejected_ids) == expected
        items.append(item)
        trl_ids.append((cut, full))
    with torch.no_grad():
        for s in range(0, min(len(items), 16), 8):
            ours = answer_logps(model, collate(items[s:s + 8], tok.pad_token_id)).logps
            for j, (cut, full) in enumerate(trl_ids[s:s + 8]):
                for a, ids in enumerate(full):
                    logits = model(input_ids=torch.tensor([ids])).logits[0]
                    direct = F.log_softmax(logits[cut - 1:-1], -1).gather(-1, torch.tensor(ids[cut:])[:, None]).sum()
                    worst = max(worst, abs(float(ours[2 * j + a] - direct)) / max(1.0, abs(float(direct))))
    print("RESULT " + json.dumps({"pairs": len(items), "same_ids": same, "worst_rel_logp_diff": worst}), flush=True)


def worker_rate(args) -> None:
    """The machine's fp32 matmul rate with the runs' thread count: the denominator of utilization."""
    import torch

    torch.set_num_threads(args.threads)
    print("RESULT " + json.dumps({"flops_per_s": matmul_rate("float32", 2048, 10)}), flush=True)


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ------------------------------------------------------------------------------------------- the driver
def _sub(args, mode: str, fixture: Path, bs: int, flags: list[str] = (), env=None) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--fixture", str(fixture), "--steps", str(args.steps),
           "--bs", str(bs), "--max-length", str(args.max_length), "--threads", str(args.threads)]
    cmd += [f"--flag={f}" for f in flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **(env or {})}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise RuntimeError(f"{mode} {flags}: failed\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT "):])


def run_trl(args, fixture: Path, bs: int) -> dict | None:
    shared = shared_dir()
    try:
        import trl  # noqa: F401
    except ImportError:
        return None
    if shared is None:
        return None
    cmd = [sys.executable, str(shared / "bench" / "trl_dpo.py"), str(fixture), "--steps", str(args.steps),
           "--bs", str(bs), "--max-length", str(args.max_length)]
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    found = dict(re.findall(r"(pairs_per_s|peak_rss_mb|first_loss)=([-\d.]+)", out.stdout))
    if out.returncode or len(found) < 3:
        raise RuntimeError(f"TRL run failed\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return {k: float(v) for k, v in found.items()}


def pair_lengths(fixture: Path, n: int, max_length: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) tokens of the benchmark pairs after truncation (preftune's rule = TRL's)."""
    sys.path.insert(0, str(ROOT / "src"))
    from preftune.data.records import PreferencePair
    from preftune.data.tokenize import tokenize_all
    from preftune.models.load import load_tokenizer

    tok = load_tokenizer(str(fixture / "model"))
    rows = [json.loads(x) for x in (fixture / "pairs.jsonl").read_text().splitlines()[:n]]
    items, _ = tokenize_all(tok, [PreferencePair(r["prompt"], r["chosen"], r["rejected"], None, "") for r in rows
                                  if r["chosen"].strip() and r["rejected"].strip()], max_length=max_length)
    return [(len(i.prompt_ids), len(i.chosen_ids), len(i.rejected_ids)) for i in items]


def trl_tokens_per_step(lengths: list[tuple[int, int, int]], bs: int) -> float:
    """Tokens in the padded batches TRL forms (chosen and rejected rows, each prompt+answer, padded to the
    longest row), averaged over consecutive batches of the benchmark pairs: what its model computes per step."""
    sizes = [2 * bs * max(p + max(c, r) for p, c, r in lengths[s:s + bs]) for s in range(0, len(lengths) - bs + 1, bs)]
    return statistics.mean(sizes)


def measure(args, fixture: Path, bs: int, variants: dict[str, list[str]]) -> list[dict]:
    """TRL and each preftune variant, one row per run. The default settings run right before and right after
    TRL: on a shared machine the load drifts, and the two rows show by how much."""
    cache = tempfile.mkdtemp(prefix="bench-ref-")
    atexit.register(shutil.rmtree, cache, True)  # the run folders hold a model each

    def run_variant(name, label=""):
        flags = variants[name]
        if "--precompute-ref" in flags:  # fill the cache once (not timed); the timed run reuses it
            flags = [*flags, f"--ref-cache-dir={cache}"]
            _sub(args, "preftune", fixture, bs, flags)
        r = _sub(args, "preftune", fixture, bs, flags)
        steady = r.pop("steady_step_s")
        row = {"name": name + label, "pairs_per_s": bs / statistics.mean(steady),
               "median_pairs_per_s": bs / statistics.median(steady), **r}
        print(f"  {row['name']}: {row['pairs_per_s']:.2f} pairs/s", flush=True)
        return row

    default = next(name for name, flags in variants.items() if not flags)
    rows = [run_variant(default, ", run before TRL")]
    trl = run_trl(args, fixture, bs) if not args.skip_trl else None
    if trl:
        trl["tokens_per_step"] = trl_tokens_per_step(pair_lengths(fixture, bs * (args.steps + 1), args.max_length), bs)
        rows.insert(0, {"name": "TRL DPOTrainer", **trl})
        print(f"  TRL: {trl}", flush=True)
    rows.append(run_variant(default, ", run after TRL"))
    rows += [run_variant(name) for name in variants if name != default]
    shape = Shape.of(json.loads((fixture / "model" / "config.json").read_text()))
    lengths = pair_lengths(fixture, bs * (args.steps + 1), args.max_length)
    for r in rows:
        tool = "trl" if r["name"].startswith("TRL") else "preftune"
        cached = "--precompute-ref" in variants.get(r["name"], [])  # no reference forward: not counted as work
        r["useful_flops_per_step"] = bs * mean_pair_flops(shape, lengths, tool=tool, reference=not cached)
        r["bs"] = bs
    return rows


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["name"].startswith("TRL")), None)
    lines = ["| run | pairs/s | median pairs/s | peak RSS MB | tokens/step | useful GFLOP/step | utilization | first loss "
             "| speed vs TRL | RSS vs TRL |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        speed = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x" if base else "-"
        rss = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "-"
        median = f"{r['median_pairs_per_s']:.2f}" if "median_pairs_per_s" in r else "-"
        tokens = f"{r['tokens_per_step']:.0f}" if "tokens_per_step" in r else "-"
        if r["name"].startswith("TRL"):
            tokens = f"{tokens} (padded)"
        lines.append(f"| {r['name']} | {r['pairs_per_s']:.2f} | {median} | {r['peak_rss_mb']:.0f} | {tokens} | "
                     f"{r['useful_flops_per_step'] / 1e9:.1f} | {r['utilization']:.1%} | {r['first_loss']:.6f} | {speed} | "
                     f"{rss} |")
    return "\n".join(lines)


def fixture_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the options every CPU benchmark here shares: the two fixtures and the thread count."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--fixture", default="/tmp/preftune-bench/base")
    ap.add_argument("--vocab-fixture", default="/tmp/preftune-bench/vocab151936",
                    help="Fixture with vocab 151,936 (built with make_fixture.py --vocab 151936); '' skips it.")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main() -> None:
    ap = fixture_parser(__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--only-default", action="store_true", help="Only TRL and preftune's default settings.")
    ap.add_argument("--check-pairs", type=int, default=64)
    ap.add_argument("--out", default="", help="Also write the tables (markdown) here.")
    ap.add_argument("--worker", choices=["preftune", "check", "rate"], help=argparse.SUPPRESS)
    ap.add_argument("--flag", dest="flags", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "preftune":
        return worker_preftune(args)
    if args.worker == "check":
        return worker_check(args)
    if args.worker == "rate":
        return worker_rate(args)

    fixture = ensure_fixture(Path(args.fixture))
    started = time.strftime("%Y-%m-%d %H:%M")
    variants = {k: v for k, v in VARIANTS.items() if not args.only_default or v == []}
    check = _sub(args, "check", fixture, args.bs, [])
    args.rate = _sub(args, "rate", fixture, args.bs, [])["flops_per_s"]
    print(f"fp32 matmul 2048^3 with {args.threads} threads: {args.rate / 1e9:.0f} GFLOP/s", flush=True)
    print(f"tokenisation: {check['same_ids']}/{check['pairs']} pairs give TRL's ids; our answer log-probs vs a "
          f"direct forward of those ids: worst relative difference {check['worst_rel_logp_diff']:.1e}", flush=True)
    print(f"fixture {fixture}, batch {args.bs}:", flush=True)
    sections = [(f"vocab 32,000, batch {args.bs}", measure(args, fixture, args.bs, variants))]
    if args.vocab_fixture:
        big = ensure_fixture(Path(args.vocab_fixture), vocab=151936)
        print(f"fixture {big}, batch 2:", flush=True)
        sections.append(("vocab 151,936, batch 2",
                         measure(args, big, 2, {k: v for k, v in variants.items() if v == []})))
    # The rate again after the runs: a shared machine's rate drifts, and one low reading would inflate every
    # utilization. The higher of the two is the denominator (the conservative choice).
    rate_after = _sub(args, "rate", fixture, args.bs, [])["flops_per_s"]
    rates = f"{args.rate / 1e9:.0f} GFLOP/s before the runs, {rate_after / 1e9:.0f} after"
    args.rate = max(args.rate, rate_after)
    for _, rows in sections:
        for r in rows:
            r["utilization"] = r["useful_flops_per_step"] * r["pairs_per_s"] / r.pop("bs") / args.rate
    cpu = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    text = [f"Measured {started} on {cpu}; {args.threads} threads; {args.steps} steps per run; max_length "
            f"{args.max_length}; fp32. fp32 matmul rate (2048^3, same threads): {rates}; utilization = useful FLOPs "
            f"per second / the higher rate (benchmarks/flops.py).", "",
            f"Tokenisation: {check['same_ids']}/{check['pairs']} fixture pairs give exactly TRL's ids; summed answer "
            f"log-probs match a direct forward of them to {check['worst_rel_logp_diff']:.1e} (relative).", ""]
    for title, rows in sections:
        text += [f"**{title}**", "", table(rows), ""]
    print("\n".join(text))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(text))


if __name__ == "__main__":
    main()
