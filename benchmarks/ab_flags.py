"""Two preftune settings side by side on the benchmark fixture: runs alternate A, B, A, B, ... so a shared
machine's drifting load falls on both alike.

    python benchmarks/ab_flags.py --b-flag=--fused-norms [--a-flag=...] [--rounds 3] [--steps 8] [--bs 8]

Each run is `bench_dpo.py`'s preftune worker (its own subprocess: default settings plus the flags given, fp32,
2 threads, max_length 512). Per setting: the median of every steady step (the first step of each run left out)
over all its rounds, the peak RSS, and the ratio B / A of the median step times; `uptime` before and after.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo import _sub, ensure_fixture  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="/tmp/preftune-bench/base")
    ap.add_argument("--a-flag", dest="a", action="append", default=[], help="A preftune flag of setting A.")
    ap.add_argument("--b-flag", dest="b", action="append", default=[], help="A preftune flag of setting B.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    fixture = ensure_fixture(Path(args.fixture))
    uptime = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    steps = {"A": [], "B": []}
    rss = {"A": 0.0, "B": 0.0}
    for r in range(args.rounds):
        for name, flags in (("A", args.a), ("B", args.b)):
            res = _sub(args, "preftune", fixture, args.bs, flags)
            steps[name] += res["steady_step_s"]
            rss[name] = max(rss[name], res["peak_rss_mb"])
            print(f"round {r + 1} {name} {' '.join(flags) or '(defaults)'}: median step "
                  f"{statistics.median(res['steady_step_s']):.3f} s", flush=True)
    uptime.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    med = {k: statistics.median(v) for k, v in steps.items()}
    print(f"\nfixture {fixture}, batch {args.bs}, {args.rounds} rounds of {args.steps} steps; load before: "
          f"`{uptime[0]}`; after: `{uptime[1]}`\n")
    print("| setting | flags | median step s | pairs/s | peak RSS MB |\n| --- | --- | ---: | ---: | ---: |")
    for k, flags in (("A", args.a), ("B", args.b)):
        print(f"| {k} | {' '.join(flags) or '(defaults)'} | {med[k]:.3f} | {args.bs / med[k]:.2f} | {rss[k]:.0f} |")
    print(f"\nB / A median step time: {med['B'] / med['A']:.3f}")


if __name__ == "__main__":
    main()
