"""The tracker's printed memory estimate against the memory it really adds.

For each case (a model, k tracked samples, a batch size, an optimizer, and ``hvp_chunk_size``: given, or the
default, with which the tracker plans the rows and picks the HVP method on a training batch) the same short fit
(2 optimizer steps) runs twice, once bare and once with an ``InfluenceTracker`` tracking k samples, each in a
process of its own: a worker process imports torch and Lightning once and then forks one child per run, so that
every run starts from the same memory. A child reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the high-water mark the kernel keeps). The tracker's extra peak
is the tracked run's peak minus the bare run's; the estimate is the ``peak ≈ … GiB above training`` figure of
the line the tracker logs at train start.

Two workers measure: one with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_=131072``, glibc's own
starting value: every block of 128 KiB or more is returned to the system when freed, so the resident set follows
what the tensors occupy) and one with glibc's defaults (the threshold then rises with the blocks freed, up to
32 MiB, and blocks below it stay resident after they are freed, so a run can hold more than its tensors need).
The estimate is of the first; the second is what ``top`` shows on a stock Linux machine.

Models (float32, AdamW unless said): logistic regression 784 → 10; an MLP 784-128-128-10 (tanh); a CNN
(conv 1→8 3×3, ReLU, 2×2 max-pool, conv 8→16 3×3, ReLU, 2×2 max-pool, linear → 10) on 28×28 or 16×16
inputs. The data are random (memory does not depend on the values). No logger, no queries, and no
checkpoint except in the row that says so (the estimate there is the figure for saving a checkpoint).

Run:  python benchmarks/memory.py            (all cases, both workers: about 3 minutes on 2 CPU cores)
      python benchmarks/memory.py --quick    (the cases of tests/core/test_memory_estimate.py, pinned only: ~20 s)
      python benchmarks/memory.py --json     (one JSON object per case instead of the table)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, InfluenceTracker
from lightning_influence.testing import TinyClassifier, lightning_trainer

MIB = 2**20
ESTIMATE = re.compile(r"peak ≈ ([\d.]+) GiB above training \(≈ ([\d.]+) GiB while a checkpoint is saved\)")
PINNED_THRESHOLD = 128 * 1024
CHUNK = re.compile(r"call\(s\) of ≤(\d+) rows")


@dataclass(frozen=True)
class Case:
    model: str  # "logreg" | "mlp" | "cnn28" | "cnn16"
    k: int
    chunk: int | None  # hvp_chunk_size; None: the default (the tracker plans the rows and picks the HVP method)
    batch: int = 64
    optimizer: str = "adamw"  # "adamw" | "sgd" (momentum 0.9)
    estimator: str = "acc"
    steps: int = 2
    checkpoint: bool = False  # a ModelCheckpoint saves at the end (the estimate: its figure for that moment)


QUICK = (Case("logreg", 2000, 2000, batch=32), Case("mlp", 300, 100, batch=4), Case("cnn16", 40, 40, batch=128))
FULL = QUICK + (
    Case("logreg", 4000, 2000, optimizer="sgd"),
    Case("mlp", 600, 100),
    Case("mlp", 600, 100, optimizer="sgd", batch=32),
    Case("mlp", 600, 100, estimator="first-order"),
    Case("mlp", 600, 100, checkpoint=True),
    Case("cnn28", 48, 48),
    Case("cnn28", 300, 64, batch=32),
    Case("cnn16", 40, None, batch=128),  # the default: the HVP method and rows are timed, so they vary by run
    Case("mlp", 600, None),
    Case("cnn28", 300, None, batch=32),
)


def build_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "logreg":
        return nn.Linear(784, 10), (784,)
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)), (784,)
    side = {"cnn28": 28, "cnn16": 16}[name]
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (side // 4) ** 2, 10),
    )  # fmt: skip
    return net, (1, side, side)


def fit_once(case: Case, tracked: bool) -> dict:
    """One short fit; its peak RSS (MiB) and the tracker's announced lines."""
    net, shape = build_model(case.model)
    n = max(case.k, case.batch * case.steps)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=case.batch, shuffle=False)
    if case.optimizer == "sgd":
        model = TinyClassifier(net, lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))
    else:
        model = TinyClassifier(net, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lightning.pytorch").addHandler(handler)
    tracker = InfluenceTracker(track=list(range(case.k)), estimator=case.estimator, hvp_chunk_size=case.chunk)
    callbacks = [tracker] if tracked else []
    with tempfile.TemporaryDirectory() as root:
        trainer = lightning_trainer(
            1, precision="32-true", max_steps=case.steps, callbacks=callbacks, enable_checkpointing=case.checkpoint,
            default_root_dir=root,
        )  # fmt: skip
        trainer.fit(model, loader)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # Linux: KiB
    lines = [line for line in lines if line.startswith("InfluenceTracker")]
    hvp = getattr(tracker.engine, "hvp_choice", None) if tracked else None  # how the engine ran its HVP rows
    return {"peak_mib": peak, "p": sum(q.numel() for q in net.parameters()), "lines": lines, "hvp": str(hvp)}


def in_child(fn, *args) -> dict:
    """``fn(*args)`` in a forked child: every run starts from this process's memory, imports done
    (benchmarks/scaling.py uses it too)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = fn(*args)
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            out = {"error": repr(err)}
        with os.fdopen(write, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = json.loads(f.read() or '{"error": "no output"}')
    os.waitpid(pid, 0)
    if "error" in out:
        raise RuntimeError(f"{fn.__name__}{args}: {out['error']}")
    return out


def measure(case: Case) -> dict:
    """Estimate and measured extra peak of one case, in MiB."""
    bare = in_child(fit_once, case, False)
    tracked = in_child(fit_once, case, True)
    text = " ".join(tracked["lines"])
    step, saving = (float(g) for g in ESTIMATE.search(text).groups())
    return {
        **asdict(case),
        "p": tracked["p"],
        "chunk_rows": int(CHUNK.search(text).group(1)),
        "hvp": tracked["hvp"],
        "estimate_mib": round(max(step, saving if case.checkpoint else 0) * 1024, 1),
        "measured_mib": round(tracked["peak_mib"] - bare["peak_mib"], 1),
        "bare_peak_mib": round(bare["peak_mib"], 1),
    }


def worker(cases: tuple[Case, ...]) -> None:
    """Measures every case here (imports done once), one JSON line each."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for case in cases:
        print(json.dumps(measure(case)), flush=True)


def run_worker(quick: bool, pinned: bool) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    if pinned:
        env["MALLOC_MMAP_THRESHOLD_"] = str(PINNED_THRESHOLD)
    command = [sys.executable, os.path.abspath(__file__), "--worker"] + (["--quick"] if quick else [])
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"worker failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the test's cases, pinned threshold only")
    parser.add_argument("--json", action="store_true", help="one JSON object per case instead of the table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("ru_maxrss in KiB, glibc's malloc and os.fork: this script runs on Linux.")
    if args.worker:
        return worker(QUICK if args.quick else FULL)
    rows = run_worker(args.quick, pinned=True)
    default = [None] * len(rows) if args.quick else run_worker(False, pinned=False)
    for row, other in zip(rows, default):
        row["ratio"] = round(row["estimate_mib"] / row["measured_mib"], 3)
        if other is not None:
            row["measured_default_malloc_mib"] = other["measured_mib"]
            row["ratio_default_malloc"] = round(row["estimate_mib"] / other["measured_mib"], 3)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print(f"torch {torch.__version__}, {platform.machine()}, {min(2, os.cpu_count() or 1)} threads; MiB\n")
    head = "| model | optimizer | estimator | p | k | batch | HVP chunk | estimate | measured | estimate / measured |"
    with_default = "measured_default_malloc_mib" in rows[0]
    if with_default:
        head += " measured, glibc defaults | estimate / measured |"
    print(head)
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if with_default else ""))
    for r in rows:
        line = (
            f"| {r['model'] + (' + checkpoint' if r['checkpoint'] else '')} | {r['optimizer']} | {r['estimator']}"
            f" | {r['p']} | {r['k']} | {r['batch']}"
            f" | {r['chunk_rows']}{'' if r['chunk'] else ' (default: ' + r['hvp'].split(' (')[0] + ')'} |"
            f" {r['estimate_mib']:.0f} | {r['measured_mib']:.0f} | {r['ratio']:.2f} |"
        )
        if with_default:
            line += f" {r['measured_default_malloc_mib']:.0f} | {r['ratio_default_malloc']:.2f} |"
        print(line)


if __name__ == "__main__":
    main()
