"""Scaling curves: the tracker's time and memory per optimizer step as k (tracked samples) and p (parameters) grow.

Two sweeps, float32, batch 32, AdamW (lr 1e-3, weight decay 1e-2), estimator ``"acc"``, synthetic data
(n=8192, d=64, 10 classes) and an MLP 64-h-10 (tanh):

- **k sweep**: h=32 (p=2410), k = 1, 4, 16, 64, 256, 1024, 4096;
- **p sweep**: k=16, h chosen so that p = 75·h + 10 ≈ 1e3, 1e4, 1e5, 1e6.

**Time** (in this process, ``--threads`` threads, default 1): as ``benchmarks/overhead.py`` does it, whose helpers
this script imports. Bare and tracked Lightning runs alternate ``--repeats`` times; a callback stamps every
``on_train_batch_start``; the median step after the warm-up steps is taken and the smallest median of each kept;
the tracker's overhead is tracked minus bare. The *HVP floor* is the cheapest way the tracker can do its core
work: build the step's gradient graph and apply the HVP to the k state rows, in the way (``"vmap"`` over c rows
or ``"loop"``) that ``lightning_influence.autodiff.hvp_plan.choose_hvp`` measures cheapest, with the same row cap as the
tracker (its ``chunk_size``), at the trained parameters, on a training batch, with the tracker's real states.

**Memory**: a worker process imports torch and Lightning once and forks a fresh child per run; a child reads
its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) before and after a short fit
(``--mem-steps`` steps, the first step's self-checks and HVP tuning included). The tracker's memory is the
tracked run's peak increase minus the bare run's. The worker pins glibc's mmap threshold at 128 KiB
(``MALLOC_MMAP_THRESHOLD_=131072``, as ``benchmarks/memory.py`` does) so that the resident set follows what
the tensors occupy; the HVP rows the tracker tunes on its probe batch can then differ from the timed runs' (the
table says which it used). "Cold" is a fresh process; "warm" runs a tracked fit of a 64-1-10 MLP first, so that
one-off costs (first use of ``torch.func``, code paths) are paid before the measured fit. The estimate is the
tracker's own plan, announced at fit start (states + HVP workspace).

Run:  python benchmarks/scaling.py            (about 1.5 minutes on 2 busy CPU cores: 91 s in docs/scaling.md)
      python benchmarks/scaling.py --quick    (three k and two p, fewer steps: about 15 s)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
from memory import in_child
from overhead import BATCH, fit, make_optimizer, median_time, synthetic
from torch import nn

from lightning_influence import InfluenceTracker
from lightning_influence import build as tracker_build
from lightning_influence.autodiff.hvp_plan import choose_hvp
from lightning_influence.estimators.engine import MemoryPlan

N, D, C, H = 8192, 64, 10, 32
KS, KS_QUICK = (1, 4, 16, 64, 256, 1024, 4096), (1, 64, 1024)
PS, PS_QUICK = (1_000, 10_000, 100_000, 1_000_000), (1_000, 100_000)
K_FIXED = 16
MIB = 2**20
PINNED_THRESHOLD = 128 * 1024
IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "images")


# ----------------------------------------------------------------------------- points and models
def width_for(p: int) -> int:
    """Hidden width h of the MLP 64-h-10, whose p = (D + 1 + C)·h + C, nearest to p."""
    return max(1, round((p - C) / (D + 1 + C)))


def mlp(h: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, h), nn.Tanh(), nn.Linear(h, C))


def num_params(h: int) -> int:
    return (D + 1 + C) * h + C


def track_ids(k: int) -> torch.Tensor:
    return torch.randperm(N, generator=torch.Generator().manual_seed(1))[:k].sort().values


def points(quick: bool, max_kp: float) -> tuple[list[dict], list[str]]:
    """The sweeps' points (``sweep``, ``k``, ``h``, ``p``) and a note per point skipped for its size."""
    wanted = [dict(sweep="k", k=k, h=H) for k in (KS_QUICK if quick else KS)]
    wanted += [dict(sweep="p", k=K_FIXED, h=width_for(p)) for p in (PS_QUICK if quick else PS)]
    kept, skipped = [], []
    for point in wanted:
        point["p"] = num_params(point["h"])
        if point["k"] * point["p"] > max_kp:
            skipped.append(f"skipped {point['sweep']} sweep k={point['k']}, p={point['p']}: k·p > {max_kp:.0e}")
        else:
            kept.append(point)
    return kept, skipped


# ----------------------------------------------------------------------------- time
def floor_ms(tracker: InfluenceTracker, model, x, y, reps: int) -> tuple[float, str]:
    """The HVP floor (ms): the step's gradient graph plus the HVP of the k state rows, the cheapest way measured."""
    engine = tracker.engine
    loss = engine.loss
    named = dict(model.named_parameters())
    theta = loss.layout.flatten([named[n].detach() for n in loss.layout.names]).clone()
    ids = torch.arange(BATCH)
    batch = [(x[ids], y[ids], ids)]
    states = engine.states["theta"].clone()
    with torch.enable_grad():

        def build(method: str):
            return loss.linearize(theta, batch, method=method)[1]

        choice = choose_hvp(build, states, max_rows=engine.chunk_size)

        def step() -> None:
            hvp = build(choice.method)
            for start in range(0, len(states), choice.rows):
                hvp(states[start : start + choice.rows])

        return median_time(step, reps) * 1e3, f"{choice.method}×{choice.rows}"


def time_point(point: dict, x, y, args) -> dict:
    """Bare and tracked step times (ms, the smallest median over the repeats) and the floor of one point."""
    t_bare = t_tracked = float("inf")
    for _ in range(args.repeats):
        _, _, bare = fit(mlp(point["h"]), make_optimizer("adamw"), x, y, args.steps, None, 0)
        tracker = InfluenceTracker(track=track_ids(point["k"]))
        model, _, tracked = fit(mlp(point["h"]), make_optimizer("adamw"), x, y, args.steps, tracker, 0)
        t_bare = min(t_bare, statistics.median(bare.step_times(args.warmup)) * 1e3)
        t_tracked = min(t_tracked, statistics.median(tracked.step_times(args.warmup)) * 1e3)
    floor, how = floor_ms(tracker, model, x, y, args.reps)
    choice = tracker.engine.hvp_choice
    return dict(point, bare=t_bare, tracked=t_tracked, overhead=t_tracked - t_bare, floor=floor, floor_hvp=how,
                tracker_hvp=f"{choice.method}×{choice.rows}")  # fmt: skip


# ----------------------------------------------------------------------------- memory
def fit_memory(point: dict, tracked: bool, steps: int, warm: bool) -> dict:
    """One short fit in this (fresh) process: its peak RSS increase (MiB) and, tracked, the announced plan. ``warm``:
    after a tracked warm-up fit of a 64-1-10 MLP (k=1), so that one-off costs (first use of torch.func) are paid."""
    x, y = synthetic(N, D, C)
    plans: list = []
    announce = tracker_build.describe_plan

    def spy(*args, **kwargs) -> str:  # the plan behind the line the tracker announces at fit start
        text = announce(*args, **kwargs)
        plans.append((next(a for a in (*args, *kwargs.values()) if isinstance(a, MemoryPlan)), text))
        return text

    tracker_build.describe_plan = spy
    if warm:
        fit(mlp(1), make_optimizer("adamw"), x, y, steps, InfluenceTracker(track=track_ids(1)), 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    tracker = InfluenceTracker(track=track_ids(point["k"])) if tracked else None
    fit(mlp(point["h"]), make_optimizer("adamw"), x, y, steps, tracker, 0)
    out = {"peak": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
    if tracked:
        plan, text = plans[-1]
        choice = tracker.engine.hvp_choice
        out.update(states=plan.state_bytes / MIB, estimate=plan.total_bytes / MIB, line=text,
                   hvp=f"{choice.method}×{choice.rows}")  # fmt: skip
    return out


def memory_worker(todo: list[dict], steps: int) -> None:
    """One JSON line per point: its bare and tracked fits, cold and warm, each in a fresh child."""
    for point in todo:
        out = dict(point)
        for mode in ("cold", "warm"):
            bare = in_child(fit_memory, point, False, steps, mode == "warm")
            tracked = in_child(fit_memory, point, True, steps, mode == "warm")
            out.update({f"bare_{mode}": bare["peak"], mode: tracked["peak"] - bare["peak"]})
            out[f"hvp_{mode}"] = tracked["hvp"]
            out.update(states=tracked["states"], estimate=tracked["estimate"], line=tracked["line"])
        print(json.dumps(out), flush=True)


def run_memory(todo: list[dict], args) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env["MALLOC_MMAP_THRESHOLD_"] = str(PINNED_THRESHOLD)
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", "--threads", str(args.threads),
               "--mem-steps", str(args.mem_steps), "--points", json.dumps(todo)]  # fmt: skip
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"memory worker failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


# ----------------------------------------------------------------------------- output
def print_tables(timed: list[dict], memory: list[dict]) -> None:
    print("| sweep | k | hidden | p | bare step (ms) | step with tracker (ms) | tracker overhead (ms) | HVP floor (ms)"
          " | overhead / floor | floor's HVP | tracker's HVP |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in timed:
        print(f"| {r['sweep']} | {r['k']} | {r['h']} | {r['p']:,} | {r['bare']:.2f} | {r['tracked']:.2f} |"
              f" {r['overhead']:.2f} | {r['floor']:.2f} | {r['overhead'] / r['floor']:.2f} | {r['floor_hvp']} |"
              f" {r['tracker_hvp']} |")  # fmt: skip
    print()
    print(
        "| sweep | k | hidden | p | states k·p·3 (MiB) | estimate: states + workspace (MiB) | bare fit peak increase"
        " (MiB) | tracker, cold (MiB) | tracker, warm (MiB) | warm / estimate | tracker's HVP, cold / warm |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in memory:
        print(f"| {r['sweep']} | {r['k']} | {r['h']} | {r['p']:,} | {r['states']:.2f} | {r['estimate']:.2f} |"
              f" {r['bare_cold']:.1f} | {r['cold']:.1f} | {r['warm']:.1f} | {r['warm'] / r['estimate']:.2f} |"
              f" {r['hvp_cold']} / {r['hvp_warm']} |")  # fmt: skip


def panels(rows: list[dict], series: list[tuple[str, str, str]], ylabel: str, path: str, title: str) -> None:
    """Two log-log panels (against k, against p) of ``series`` = (key, label, style); values ≤ 0 are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, sweep, xkey, xlabel in ((axes[0], "k", "k", f"k, tracked samples (p={num_params(H):,})"),
                                    (axes[1], "p", "p", f"p, parameters (k={K_FIXED})")):  # fmt: skip
        part = [r for r in rows if r["sweep"] == sweep]
        for key, label, style in series:
            pts = [(r[xkey], r[key]) for r in part if r[key] > 0]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw(timed: list[dict], memory: list[dict], threads: int) -> None:
    os.makedirs(IMAGES, exist_ok=True)
    time_series = [("overhead", "tracker overhead (tracked − bare)", "o-"), ("floor", "HVP floor", "s--"),
                   ("bare", "bare training step", "^:")]  # fmt: skip
    panels(timed, time_series, "ms per optimizer step", os.path.join(IMAGES, "scaling.png"),
           f"Time per step, MLP 64-h-10, AdamW, batch {BATCH}, {threads} thread(s)")  # fmt: skip
    mem_series = [("cold", "tracker, measured, fresh process", "o-"), ("warm", "tracker, measured, warm", "D-"),
                  ("estimate", "tracker's estimate", "s--"), ("states", "states k·p·3", "^:")]  # fmt: skip
    panels(memory, mem_series, "MiB", os.path.join(IMAGES, "scaling_memory.png"),
           "Memory the tracker adds to training's peak")  # fmt: skip


# ----------------------------------------------------------------------------- main
def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="three k, two p, fewer steps (under a minute)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per timed run (default 60, quick 25)")
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded from the median")
    ap.add_argument("--repeats", type=int, default=None, help="alternating bare/tracked runs (default 2, quick 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed floor calls (default 9, quick 6)")
    ap.add_argument("--mem-steps", type=int, default=3, help="optimizer steps of each memory fit")
    ap.add_argument("--max-kp", type=float, default=5e7, help="skip points with k·p above this")
    ap.add_argument("--no-plot", action="store_true", help="print the tables only")
    ap.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--points", default="[]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (25 if args.quick else 60)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.reps = args.reps or (6 if args.quick else 9)
    return args


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.memory_worker:
        return memory_worker(json.loads(args.points), args.mem_steps)
    if not sys.platform.startswith("linux"):
        raise SystemExit("ru_maxrss in KiB, glibc's malloc and os.fork: this script runs on Linux.")
    start = time.perf_counter()
    todo, skipped = points(args.quick, args.max_kp)
    memory = run_memory(todo, args)
    print(f"# memory: {len(memory)} points in {time.perf_counter() - start:.0f} s", flush=True)
    x, y = synthetic(N, D, C)
    timed = []
    for point in todo:
        timed.append(time_point(point, x, y, args))
        r = timed[-1]
        print(f"# {r['sweep']} sweep k={r['k']} p={r['p']}: bare {r['bare']:.2f} ms, tracked {r['tracked']:.2f} ms,"
              f" floor {r['floor']:.2f} ms", flush=True)  # fmt: skip
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}, float32, batch"
          f" {BATCH}, AdamW, estimator 'acc'; synthetic data n={N}, d={D}, {C} classes; MLP {D}-h-{C} (tanh);"
          f" {args.steps} steps per timed run (median after {args.warmup} warm-up steps, best of {args.repeats});"
          f" memory: fits of {args.mem_steps} steps, fresh process each.\n")  # fmt: skip
    for note in skipped:
        print(note)
    print_tables(timed, memory)
    print(f"\nthe tracker's line at fit start, largest k: {max(memory, key=lambda r: r['k'])['line']}")
    if not args.no_plot:
        draw(timed, memory, args.threads)
    print(f"\ntotal time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
