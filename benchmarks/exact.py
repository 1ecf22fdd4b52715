"""The exact estimator: its cost per tracked state against "acc", and its precision in float32.

1. **Cost per state**: the median time of one booked optimizer step of ``InfluenceEngine("acc")`` and of
   ``ExactEngine`` at the same k, on the trained parameters of an MLP (digits) and a CNN, divided by k.
   ``"acc"`` pays one vectorised Hessian-vector product per state; ``"exact"`` one batch gradient at the
   state's own parameters.
2. **float32 precision**: the mlp-adamw faithfulness setup trained in float32 with ``"exact"`` and
   ``"acc"`` trackers, against leave-one-out retraining in float64 from the same initial weights and batches
   (Spearman and relative RMSE), next to the float64 trackers. In float32, θ + δθ_j rounds and the
   counterfactual runs differ from the factual one by amounts near float32's resolution.

Run:  python benchmarks/exact.py           (about 1 minute on 2 CPU cores)
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings

import torch
from torch import nn

from lightning_influence import InfluenceTracker
from lightning_influence.testing import (
    TinyClassifier,
    agreement,
    fixed_loader,
    leave_one_out,
    lightning_trainer,
    random_classification,
    random_schedule,
)


def median_ms(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def step_cost(kind: str, k: int) -> tuple[float, float]:
    """(acc ms, exact ms) for one booked step with k tracked samples, on a briefly trained model."""
    torch.manual_seed(0)
    if kind == "mlp":
        x, y, _ = random_classification(512, 64, 10, dtype=torch.float32)
        net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    else:
        x = torch.randn(512, 3, 16, 16)
        y = torch.randint(0, 10, (512,))
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
        )
    schedule = random_schedule(len(x), 64, 1, seed=1)
    out = []
    for estimator in ("acc", "exact"):
        tracker = InfluenceTracker(estimator=estimator, track=list(range(0, len(x), len(x) // k))[:k])
        timer = _LastStep(tracker)
        trainer = lightning_trainer(1, precision="32-true", callbacks=[tracker, timer])
        trainer.fit(TinyClassifier(copy.deepcopy(net), lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
                    fixed_loader(x, y, schedule))  # fmt: skip
        out.append(median_ms(timer.replay))
    return out[0], out[1]


class _LastStep(InfluenceTracker.__mro__[1]):  # a plain Lightning Callback
    """Keeps the last step record and parts handed to the estimator, to time its booking in isolation."""

    def __init__(self, tracker: InfluenceTracker) -> None:
        self.tracker = tracker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        engine = self.tracker.engine
        original = type(engine).book.__get__(engine)

        def keep(record, parts, reduce=None):
            self.args = (record, parts)
            return original(record, parts, reduce)

        engine.book = keep

    def replay(self) -> None:
        record, parts = self.args
        states = {b: s.clone() for b, s in self.tracker.engine.states.items()}
        with torch.enable_grad():
            type(self.tracker.engine).book(self.tracker.engine, record, parts)
        for b, s in states.items():
            self.tracker.engine.states[b].copy_(s)


def float32_precision() -> list[tuple[str, str, dict]]:
    """mlp-adamw (48 samples, 4 epochs of 8) trained in float32 and float64, against float64 leave-one-out."""
    x, y, (xq, yq) = random_classification(48, 8, 4, num_query=32, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    schedule = random_schedule(48, 8, 4, seed=0)

    def adamw(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-2)

    loo = leave_one_out(net, adamw, x, y, schedule, (xq, yq), range(48))
    rows = []
    for precision, dtype in (("64-true", torch.float64), ("32-true", torch.float32)):
        for estimator in ("exact", "acc"):
            tracker = InfluenceTracker(estimator=estimator, queries={"q": (xq.to(dtype), yq)}, write_artifacts=False)
            model = TinyClassifier(copy.deepcopy(net).to(dtype), adamw)
            lightning_trainer(len(schedule), precision=precision, callbacks=[tracker]).fit(
                model, fixed_loader(x.to(dtype), y, schedule)
            )
            rows.append((precision, estimator, agreement(tracker.influence("q").scores.double(), loo)))
    return rows


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    threads = torch.get_num_threads()
    print(f"## exact vs acc: cost per tracked state (float32, torch {torch.__version__}, {threads} threads)\n")
    print("| model | k | acc step (ms) | exact step (ms) | acc per state (ms) | exact per state (ms) | exact / acc |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in ("mlp", "cnn"):
        for k in (16, 64):
            acc, exact = step_cost(kind, k)
            print(f"| {kind} | {k} | {acc:.1f} | {exact:.1f} | {acc / k:.3f} | {exact / k:.3f} | {exact / acc:.2f} |")
    print("\n## float32 precision against float64 leave-one-out retraining (mlp-adamw, 48 samples)\n")
    print("| precision | estimator | Spearman | Pearson | rel. RMSE |")
    print("|---|---|---:|---:|---:|")
    for precision, estimator, m in float32_precision():
        print(f"| {precision} | {estimator} | {m['spearman']:.4f} | {m['pearson']:.4f} | {m['rel_rmse']:.2e} |")


if __name__ == "__main__":
    main()
