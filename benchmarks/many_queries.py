"""Many per-example queries over every training sample: one adjoint row per example against the query sketch.

A digits MLP (scikit-learn's digits, no download; 64 → 32 → 10, tanh, AdamW, float32, batch 64) is trained with
``InfluenceTracker(track=(), record_trajectory=True)``; then ``TrajectoryReplay.influence(test_batch,
per_example=True)`` scores every training sample for each of the ``--queries`` test examples, once with one adjoint
row per example (the reference) and once per ``--energy`` with the query sketch
(:mod:`lightning_influence.trajectory.query_sketch`): its directions, its wall time, the error it reports (4 rows swept
exactly) and its true error against the reference rows. Prints a markdown table; ``--quick`` is a smaller run.

    python benchmarks/many_queries.py            # ≈ 2-4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch
from default_path import fit as digits_fit
from sklearn.datasets import load_digits
from torch import nn

from lightning_influence import InfluenceTracker, load_trajectory
from lightning_influence.testing import TinyClassifier
from lightning_influence.trajectory.query_sketch import sketch_error
from lightning_influence.trajectory.replay import TrajectoryReplay


def digits(n_train: int, n_test: int):
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:n_train], order[n_train : n_train + n_test]
    return (x[train], y[train]), (x[test], y[test])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def fit(train, epochs: int, folder: str, record: bool) -> tuple[TinyClassifier, float, InfluenceTracker | None]:
    tracker = InfluenceTracker(track=(), record_trajectory=True, dirpath=folder) if record else None
    module, seconds = digits_fit(train, epochs, tracker, net=mlp)
    return module, seconds, tracker


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--energy", type=float, nargs="+", default=[0.9, 0.99, 0.999, 1.0])
    parser.add_argument("--quick", action="store_true", help="300 samples, 50 queries, 3 epochs")
    args = parser.parse_args()
    if args.quick:
        args.train, args.queries, args.epochs = 300, 50, 3
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    train, test = digits(args.train, args.queries)
    with tempfile.TemporaryDirectory() as folder:
        _, plain, _ = fit(train, args.epochs, folder + "/plain", record=False)
        module, recorded, tracker = fit(train, args.epochs, folder + "/rec", record=True)
        assert tracker is not None and tracker.dirpath is not None
        replay = TrajectoryReplay(load_trajectory(tracker.dirpath / "trajectory"), module, list(zip(*train)),
                                  progress=False)  # fmt: skip
        rows, rows_s = timed(lambda: replay.influence(test, per_example=True))
        print(f"digits MLP, {args.train} training samples, {args.queries} per-example queries, {args.epochs} epochs,"
              f" float32, {torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
        print(f"plain fit {plain:.1f} s; recording fit {recorded:.1f} s\n")
        print("| route | adjoint rows | time (s) | × plain fit | reported error | true max rel. error |")
        print("|---|---|---|---|---|---|")
        print(f"| one row per example | {args.queries} | {rows_s:.1f} | {rows_s / plain:.1f} | exact | 0 |")
        for energy in args.energy:
            sketch, seconds = timed(lambda e=energy: replay.influence(test, per_example=True, energy=e))
            note = sketch.approximation or ""
            directions = int(note.split("query sketch: ")[1].split(" ")[0])
            reported = note.split("max relative error ")[1].split(" ")[0]
            true = sketch_error(sketch.per_example, rows.per_example)
            print(f"| sketch, energy {energy:g} | {directions} + 4 | {seconds:.1f} | {seconds / plain:.1f} |"
                  f" {reported} | {true:.2e} |")  # fmt: skip


if __name__ == "__main__":
    main()
