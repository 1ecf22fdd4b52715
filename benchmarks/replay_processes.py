"""The replay on one process and on several (``load_trajectory(path).influence(..., devices=N)``, Lightning Fabric).

Records the digits CNN run of ``benchmarks/default_path.py`` (1,000 samples, 10% flipped labels, AdamW, batch 64,
float32) with ``InfluenceTracker(track=(), record_trajectory=True)``, then times the same answers on 1 process (all
the machine's threads) and on N processes (Fabric's ``ddp`` on the CPU: each process its share of the threads and of
every step's batch, the gradients and Hessian-vector products all-reduced): the scores of every sample for the
validation loss, per example for ``--examples`` validation examples, and the in-run self-influence. Prints a markdown
table with the times and the largest difference to the single-process answer (relative to its largest score).

    python benchmarks/replay_processes.py                 # 1 and 2 processes, ≈ 1 min on 2 CPU cores
    python benchmarks/replay_processes.py --model wide-cnn --epochs 2   # 0.35M parameters, ≈ 25 ms steps
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import torch
from default_path import cnn, digits, fit
from recording_cost import make_cnn, synthetic_images
from torch.utils.data import TensorDataset

from lightning_influence import IndexedDataset, InfluenceTracker, load_trajectory
from lightning_influence.testing import TinyClassifier

MODELS = {
    # name: (network, batch size, description)
    "digits-cnn": (cnn, 64, "digits CNN (3,658 parameters, 1×8×8 images)"),
    "wide-cnn": (make_cnn, 100, "CNN of benchmarks/recording_cost.py (0.35M parameters, 3×32×32 images)"),
}


def problem(model: str, n: int):
    """``(train, val)`` of the model's data: digits (10% flipped labels) or synthetic 3×32×32 images."""
    if model == "digits-cnn":
        train, val, _ = digits(n, 0.1)
        return train, val
    x, y = synthetic_images(n + 200)
    return (x[:n], y[:n]), (x[n:], y[n:])


def record(model: str, train, epochs: int, folder: str) -> tuple[TinyClassifier, float]:
    net, batch, _ = MODELS[model]
    tracker = InfluenceTracker(track=(), record_trajectory=True, dirpath=folder)
    return fit(train, epochs, tracker, net=net, batch_size=batch)


def timed(fn, repeats: int):
    """``(fn(), the least of `repeats` wall times)``: the least is the one the machine's other work disturbed least."""
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return out, best


def difference(answer: torch.Tensor, reference: torch.Tensor) -> float:
    return float((answer - reference).abs().max() / reference.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--examples", type=int, default=32, help="validation examples of the per-example answer")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", choices=sorted(MODELS), default="digits-cnn")
    parser.add_argument("--repeats", type=int, default=3, help="the least of this many runs is reported")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    train, val = problem(args.model, args.train)
    examples = (val[0][: args.examples], val[1][: args.examples])
    with tempfile.TemporaryDirectory() as folder:
        module, fit_s = record(args.model, train, args.epochs, folder)
        trajectory, dataset = load_trajectory(folder), IndexedDataset(TensorDataset(*train))
        answers = {
            "every sample, validation loss": lambda n: trajectory.influence(
                module, dataset, val, devices=n, progress=False
            ).scores,
            f"every sample × {args.examples} examples": lambda n: trajectory.influence(
                module, dataset, examples, per_example=True, devices=n, progress=False
            ).per_example,
            "in-run self-influence": lambda n: trajectory.self_influence(module, dataset, devices=n, progress=False)
            .scores,
        }  # fmt: skip
        load = os.getloadavg()[0]
        print(f"{MODELS[args.model][2]}, {args.train} samples, {args.epochs} epochs, AdamW, float32,"
              f" {threads} CPU threads, torch {torch.__version__}; recording fit {fit_s:.1f} s;"
              f" 1-min load average {load:.1f}")  # fmt: skip
        print("\n| answer | " + " | ".join(f"{n} process{'es' if n > 1 else ''} (s)" for n in args.devices)
              + " | speed-up | max rel. difference |")  # fmt: skip
        print("|---|" + "---|" * (len(args.devices) + 2))
        for name, ask in answers.items():
            ask(args.devices[0])  # warm-up: first calls, file cache
            results = [timed(lambda n=n, ask=ask: ask(n), args.repeats) for n in args.devices]
            reference = results[0][0]
            worst = max(difference(r, reference) for r, _ in results[1:]) if len(results) > 1 else 0.0
            cells = " | ".join(f"{s:.2f}" for _, s in results)
            print(f"| {name} | {cells} | {results[0][1] / results[-1][1]:.2f}× | {worst:.1e} |")
        print(f"\n1-min load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
