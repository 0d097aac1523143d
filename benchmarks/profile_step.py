"""Where preftune's default DPO step spends its CPU time: torch.profiler over a few steps on the benchmark fixture.

    python benchmarks/profile_step.py [--fixture FX] [--steps 4] [--out benchmarks/results/cpu-profile.md]

The run is `bench_dpo.py`'s preftune run with default settings (packed rows: prefix sharing without padding;
live reference, fused AdamW), fp32, 2 threads, batch 8, max_length 512. The first two steps are not recorded (allocator and
planner warm-up); the next `--steps` steps are, each from the start of its forward to the end of its optimizer
step. Writes the top operators by self CPU time, their shares grouped by kind, and the share of the profiled
time outside matrix products, with the machine's load (`uptime`) before and after. The profiler adds a few microseconds per operator, so absolute times are a little
high and small operators weigh a little more than they do unprofiled.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo import ensure_fixture  # noqa: E402

# Kinds of work. An operator belongs to the first kind that names it or one of its callers (so the `fill_` that
# zeroes the embedding's gradient counts as embedding backward, the `t` inside `linear` as matmul); one that no
# kind names, nor any caller, is elementwise when its own name is in ELEMENTWISE, else Python and other.
# A pattern is a substring of the event's name.
GROUPS = {
    "matmul (mm/addmm/bmm/linear)": ["aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul",
                                     "aten::baddbmm", "MmBackward", "AddmmBackward", "BmmBackward"],
    "attention": ["scaled_dot_product", "ScaledDotProduct", "flash_attention"],
    "embedding backward": ["embedding_dense_backward", "embedding_backward", "EmbeddingBackward"],
    "optimizer": ["Optimizer.", "_fused_adam", "aten::_foreach_", "clip_grad"],
}
ELEMENTWISE = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "neg", "pow", "rsqrt", "exp", "exp_",
               "silu", "silu_backward", "mean", "sum", "cat", "copy_", "clone", "logsumexp", "gather", "sigmoid",
               "softplus", "where", "masked_fill", "masked_fill_", "_softmax", "_softmax_backward_data", "max",
               "cos", "sin", "to", "_to_copy", "contiguous", "index", "index_select", "embedding", "cumsum",
               "log", "log_", "_log_softmax", "_log_softmax_backward_data", "linalg_vector_norm", "rsub", "sqrt",
               "reciprocal", "clamp", "clamp_", "stack", "eq", "ne", "lt", "ge", "gt", "le", "abs", "fill_",
               "zero_", "zeros_like", "zeros", "empty_like", "index_put_", "_index_put_impl_", "index_add_",
               "scatter", "scatter_add_", "isfinite", "any", "all", "erf", "tanh", "mse_loss", "_foreach_norm",
               "sort", "argsort", "repeat_interleave", "masked_scatter", "logical_and", "logical_not",
               "bitwise_and", "bitwise_not", "tril", "triu", "narrow_copy", "ones_like", "full", "arange",
               "reshape_copy", "softmax", "log_softmax", "log_sigmoid_forward", "log_sigmoid_backward",
               "sigmoid_backward", "mul_out", "addcmul_", "addcdiv_", "lerp_", "rms_norm", "_fused_rms_norm",
               "_fused_rms_norm_backward", "embedding_dense_backward"}
ELEMENTWISE_KIND = "elementwise"
OTHER = "Python, views and other"
PYTHON = "(no operator running: Python between operators)"
KINDS = [*GROUPS, ELEMENTWISE_KIND, OTHER]


def own_kind(name: str) -> str | None:
    for group, patterns in GROUPS.items():
        if any(p in name for p in patterns):
            return group
    return None


def kind_of(event) -> str:
    """The kind of a profiler event: its own or its nearest caller's named kind, else by its own name."""
    e = event
    while e is not None:
        if (k := own_kind(e.name)) is not None:
            return k
        e = e.cpu_parent
    return ELEMENTWISE_KIND if event.name.removeprefix("aten::") in ELEMENTWISE else OTHER


def group_of(name: str) -> str:
    """The kind of an operator by its name alone (the top-operators table)."""
    if name == PYTHON:
        return OTHER
    return own_kind(name) or (ELEMENTWISE_KIND if name.removeprefix("aten::") in ELEMENTWISE else OTHER)


def worker(args) -> None:
    """One profiled preftune run in this process; prints a JSON line with per-operator self CPU times."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    from preftune.cli import build_parser
    from preftune.cli.train import config_from_args
    from preftune.training.loop import execute

    warm = 2
    n = args.bs * (warm + args.steps + 1)
    rows = Path(args.fixture, "pairs.jsonl").read_text().splitlines()[:n]
    work = Path(tempfile.mkdtemp(prefix="profile-"))
    atexit.register(shutil.rmtree, work, True)  # the run folders hold a model each
    data = work / "pairs.jsonl"
    data.write_text("\n".join(rows) + "\n")
    argv = ["dpo", "--model", str(Path(args.fixture, "model")), "--data", str(data), "--output-dir",
            str(work / "run"), "--max-steps", str(warm + args.steps), "--batch-size", str(args.bs), "--max-length",
            str(args.max_length), "--lr", "1e-6", "--beta", "0.1", "--dtype", "float32", "--device", "cpu",
            "--scheduler", "linear", "--seed", "0", "--quiet", "--skip-bad-records", *args.flags]
    cfg = config_from_args(build_parser().parse_args(argv), "dpo")
    # The loop's callback runs after each step's optimizer update: it advances the profiler's schedule, so the
    # recorded window is whole steps. Setup and step 1 fall in "wait", step 2 in "warmup".
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=1, active=args.steps))
    step_s = []

    def tick(row):
        if "step" in row and "pairs_per_s" in row:
            if row["step"] > warm:
                step_s.append(args.bs / row["pairs_per_s"])
            prof.step()

    with prof:
        execute(cfg, command="profile", callbacks=[tick])
    ops, kinds = defaultdict(lambda: [0.0, 0]), defaultdict(float)
    for e in prof.events():
        if e.name.startswith("ProfilerStep"):  # its self time is the step's time in no operator
            ops[PYTHON][0] += e.self_cpu_time_total / 1e6
            kinds[OTHER] += e.self_cpu_time_total / 1e6
            continue
        ops[e.name][0] += e.self_cpu_time_total / 1e6
        ops[e.name][1] += 1
        kinds[kind_of(e)] += e.self_cpu_time_total / 1e6
    print("RESULT " + json.dumps({"step_s": step_s, "ops": ops, "kinds": kinds}), flush=True)


def report(res: dict, args, uptime: str, started: str) -> str:
    steps = len(res["step_s"])
    wall = sum(res["step_s"])
    ops = sorted(res["ops"].items(), key=lambda kv: -kv[1][0])
    traced = sum(t for t, _ in res["ops"].values())
    groups = defaultdict(float, res["kinds"])
    matmul = groups["matmul (mm/addmm/bmm/linear)"]
    total = traced  # the profiler's steps run from one tick to the next: the whole loop iteration
    cpu = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    lines = [
        f"Profiled {started} on {cpu}. Load before: `{uptime[0].strip()}`; after: `{uptime[1].strip()}`.",
        *([args.note] if args.note else []),
        "",
        f"preftune's default DPO step (packed rows: prefix sharing without padding; live reference, fused AdamW)"
        f"{''.join(' ' + f for f in args.flags)}, fp32, "
        f"{args.threads} threads, batch {args.bs}, max_length {args.max_length}, fixture `{args.fixture}`; "
        f"{steps} steps recorded after 2 unrecorded ones. Times are self CPU time (wall time inside an operator, "
        f"its callees excluded, on the calling thread), per step.",
        "",
        f"**Matrix products: {matmul / total:.1%} of the profiled time; outside them: {1 - matmul / total:.1%}.**",
        "",
        "| kind | s per step | share |",
        "| --- | ---: | ---: |",
    ]
    for g in KINDS:
        lines.append(f"| {g} | {groups[g] / steps:.3f} | {groups[g] / total:.1%} |")
    lines += ["", f"Top {args.top} operators by self CPU time:", "",
              "| operator | kind | calls per step | ms per step | share |",
              "| --- | --- | ---: | ---: | ---: |"]
    for name, (t, count) in ops[: args.top]:
        lines.append(f"| `{name}` | {group_of(name)} | {count / steps:.0f} | {1000 * t / steps:.1f} | "
                     f"{t / total:.1%} |")
    lines += ["", f"Shares are of the profiled time, {total / steps:.3f} s per step: every loop iteration from one "
              f"profiler tick to the next (the step itself, {wall / steps:.3f} s by the loop's clock, plus logging)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="/tmp/preftune-bench/base")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="", help="Also write the report (markdown) here.")
    ap.add_argument("--note", default="", help="A line written under the header (how busy the machine was).")
    ap.add_argument("--flag", dest="flags", action="append", default=[],
                    help="A preftune flag added to the default settings (repeat it), e.g. --flag=--fused-norms.")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    ensure_fixture(Path(args.fixture))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    uptime = [subprocess.run(["uptime"], capture_output=True, text=True).stdout]
    cmd = [sys.executable, __file__, "--worker", "--fixture", args.fixture, "--steps", str(args.steps), "--bs",
           str(args.bs), "--max-length", str(args.max_length), "--threads", str(args.threads),
           *[f"--flag={f}" for f in args.flags]]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    uptime.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"profiled run failed\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    text = report(json.loads(line[-1][len("RESULT "):]), args, uptime, started)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
