"""Faithfulness of the influence estimators to exact leave-one-out retraining (docs/benchmarks.md).

For each small float64 setup and seed, the script
1. draws data, an initial network and a fixed batch schedule (``random_schedule``);
2. computes the exact leave-one-out score of every training sample,
   ``loo_j = f(θ_-j(T)) − f(θ(T))`` with f the mean loss on a query set, by retraining from the same
   initial weights on the same batches with w_j = 0 (``lightning_influence.testing.leave_one_out``);
3. trains the same network on the same schedule through a Lightning ``Trainer`` with an
   ``InfluenceTracker`` per estimator and reads ``tracker.influence("q").scores``; the ``"first-order"``
   run also records its trajectory, and the row "all samples (replay)" scores every sample from it by
   the adjoint replay ([concepts.md: Every sample at once]);
4. compares the two with Spearman, Kendall τ and Pearson correlations (torchmetrics) and the
   relative RMSE ``‖s − loo‖ / ‖loo‖``.

It also lists, per setup and estimator (first seed), the samples whose estimate is far off:
the count with ``|s − loo| > 3 × median |s − loo|`` and the three largest absolute errors.

Run:  python benchmarks/faithfulness.py            (5 seeds, about a minute on 2 CPU cores)
      python benchmarks/faithfulness.py --quick    (1 seed)
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lightning_influence import InfluenceTracker
from lightning_influence.testing import (
    TinyClassifier,
    agreement,
    fixed_loader,
    leave_one_out,
    lightning_trainer,
    random_schedule,
    retrain,
)

DT = torch.float64
AUDITED = 8  # samples the "acc" run audits with the exact estimator
ESTIMATORS = [
    ("acc", "auto"),
    ("first-order", "auto"),
    ("exact", "auto"),
    ("acc", "sgd"),
    ("first-order", "sgd"),
    ("tracin", "auto"),
]


# ----------------------------------------------------------------------------- setups
@dataclass
class Setup:
    name: str
    description: str
    data: Callable[[int], tuple]  # seed -> (x, y, xq, yq)
    net: Callable[[int, int], nn.Module]  # (d, c) -> module
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    batch_size: int
    epochs: int
    plain_sgd: bool = False  # optimizer_model="sgd" is then identical to "auto": skipped


def teacher_data(n: int, nq: int, d: int, c: int, seed: int, flip: float = 0.1):
    """Gaussian inputs, labels from a random linear teacher with noise and ``flip`` random labels."""
    gen = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(d, c, generator=gen, dtype=DT)
    x = torch.randn(n + nq, d, generator=gen, dtype=DT)
    y = (x @ w + 0.7 * torch.randn(n + nq, c, generator=gen, dtype=DT)).argmax(1)
    flips = torch.rand(n + nq, generator=gen) < flip
    y[flips] = torch.randint(0, c, (int(flips.sum()),), generator=gen)
    return x[:n], y[:n], x[n:], y[n:]


def sklearn_data(loader: str, n: int, nq: int, seed: int, classes: int | None = None):
    """A random subset of a scikit-learn bundled data set (no download), standardised on the training part."""
    from sklearn import datasets

    data = getattr(datasets, loader)()
    x = torch.tensor(data.data, dtype=DT)
    y = torch.tensor(data.target, dtype=torch.long)
    if classes is not None:
        keep = y < classes
        x, y = x[keep], y[keep]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(2000 + seed))
    tr, te = perm[:n], perm[n : n + nq]
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-3)
    x = (x - mu) / sd
    return x[tr], y[tr], x[te], y[te]


def mlp(hidden: int):
    return lambda d, c: nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, c))


SETUPS = [
    Setup(
        "logreg-sgd",
        "synthetic n=64, d=8, 3 classes (linear teacher, 10% flipped labels), 32 query samples;"
        " linear softmax; SGD(lr=0.3); batch 8, 8 epochs",
        lambda s: teacher_data(64, 32, 8, 3, s),
        lambda d, c: nn.Linear(d, c),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.3),
        8,
        8,
        plain_sgd=True,
    ),
    Setup(
        "mlp-momentum",
        "synthetic n=48, d=6, 3 classes (as logreg-sgd); MLP 6-16-3 tanh; SGD(lr=0.2, momentum=0.9); batch 8, 6 epochs",
        lambda s: teacher_data(48, 32, 6, 3, s),
        mlp(16),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9),
        8,
        6,
    ),
    Setup(
        "mlp-adam",
        "synthetic n=48, d=6, 3 classes; MLP 6-16-3 tanh; Adam(lr=0.01, weight_decay=1e-3); batch 8, 6 epochs",
        lambda s: teacher_data(48, 32, 6, 3, s),
        mlp(16),
        lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=1e-3),
        8,
        6,
    ),
    Setup(
        "mlp-adamw",
        "synthetic n=48, d=6, 3 classes; MLP 6-16-3 tanh; AdamW(lr=0.01, weight_decay=0.1); batch 8, 6 epochs",
        lambda s: teacher_data(48, 32, 6, 3, s),
        mlp(16),
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1),
        8,
        6,
    ),
    Setup(
        "mlp-adamw-lr0.03",
        "as mlp-adamw with lr=0.03 (a stress case: larger steps, stronger non-linearity of leave-one-out)",
        lambda s: teacher_data(48, 32, 6, 3, s),
        mlp(16),
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.03, weight_decay=0.1),
        8,
        6,
    ),
    Setup(
        "cancer-mlp-adamw",
        "breast cancer (30 features, standardised), n=96 train / 100 query; MLP 30-16-1 tanh, logistic loss;"
        " AdamW(lr=0.01, weight_decay=0.01); batch 16, 8 epochs",
        lambda s: sklearn_data("load_breast_cancer", 96, 100, s),
        lambda d, c: mlp(16)(d, 1),
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.01),
        16,
        8,
    ),
    Setup(
        "digits-mlp-adamw",
        "digits 0-4 (64 features, standardised), n=80 train / 100 query; MLP 64-16-5 tanh;"
        " AdamW(lr=0.01, weight_decay=0.01); batch 16, 8 epochs",
        lambda s: sklearn_data("load_digits", 80, 100, s, classes=5),
        mlp(16),
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.01),
        16,
        8,
    ),
]


# ----------------------------------------------------------------------------- one comparison
def far_off(s: torch.Tensor, loo: torch.Tensor, top: int = 3) -> tuple[int, int, list[tuple[int, float, float]]]:
    """(# errors > 3 × median error, # errors > ½ RMS(loo), the ``top`` largest errors as (id, loo, s))."""
    err = (s - loo).abs()
    n_median = int((err > 3 * err.median()).sum())
    n_scale = int((err > 0.5 * loo.pow(2).mean().sqrt()).sum())
    worst = err.argsort(descending=True)[:top].tolist()
    return n_median, n_scale, [(j, float(loo[j]), float(s[j])) for j in worst]


def draw(setup: Setup, seed: int):
    """The setup's problem for ``seed``: ``(x, y, xq, yq, initial net, batch schedule)`` (benchmarks/peers.py too)."""
    x, y, xq, yq = setup.data(seed)
    d, c = x.shape[1], int(max(y.max(), yq.max())) + 1
    torch.manual_seed(seed)
    net = setup.net(d, c).to(DT)
    sched = random_schedule(len(x), setup.batch_size, setup.epochs, seed=seed)
    return x, y, xq, yq, net, sched


def run_setup(setup: Setup, seed: int):
    x, y, xq, yq, net, sched = draw(setup, seed)
    t0 = time.perf_counter()
    loo = leave_one_out(net, setup.optimizer, x, y, sched, (xq, yq), range(len(x)))
    t_loo = time.perf_counter() - t0
    reference = retrain(net, setup.optimizer, x, y, sched)

    out = {}
    t_track = 0.0
    for est, om in ESTIMATORS:
        if setup.plain_sgd and om == "sgd":
            continue
        # the first-order run also records its trajectory: the all-sample replay is measured on it
        replayed = est == "first-order" and om == "auto"
        recording = dict(record_trajectory=True, dirpath=tempfile.mkdtemp()) if replayed else {}
        if est == "acc" and om == "auto":  # the audit's own estimate of acc's agreement, next to the truth
            recording = dict(audit=AUDITED, audit_seed=seed, write_artifacts=False)
        tracker = InfluenceTracker(estimator=est, optimizer_model=om, queries={"q": (xq, yq)}, **recording)
        model = TinyClassifier(copy.deepcopy(net), setup.optimizer)
        t0 = time.perf_counter()
        lightning_trainer(len(sched), callbacks=[tracker]).fit(model, fixed_loader(x, y, sched))
        t_track += time.perf_counter() - t0
        # the tracked Lightning run must be the very run the counterfactuals perturb
        drift = max(float((a - b).abs().max()) for a, b in zip(model.net.parameters(), reference.parameters()))
        if drift > 1e-9:
            raise RuntimeError(f"{setup.name}: the Lightning run differs from the reference run by {drift:.2e}.")
        s = tracker.influence("q").scores.to(DT)
        out[(est, om)] = (agreement(s, loo), far_off(s, loo))
        if replayed:
            s = tracker.replay(progress=False).influence((xq, yq)).scores.to(DT)
            out[("all samples (replay)", om)] = (agreement(s, loo), far_off(s, loo))
            shutil.rmtree(recording["dirpath"])
        if est == "acc" and om == "auto":
            report = tracker.audit("q")
            audit = {"audit": report, "truth": agreement(s, loo)}
    return out, loo, t_loo, t_track, audit


def print_audits(audits: dict[str, list[dict]]) -> None:
    """The audit's estimate of acc's agreement (AUDITED samples, exact) next to the truth (all samples, LOO)."""
    print()
    print(f"## The audit's estimate of acc's agreement ({AUDITED} audited samples) and the truth (all samples)")
    print()
    print("| setup | Spearman: audit | Spearman: truth | Pearson: audit | Pearson: truth | rel. error: audit |"
          " rel. RMSE: truth |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in audits.items():
        cols = []
        for audit_key, truth_key in (("spearman", "spearman"), ("pearson", "pearson"), ("relative_error", "rel_rmse")):
            cols.append(fmt([getattr(r["audit"], audit_key) for r in runs]))
            if truth_key != "rel_rmse":
                cols.append(fmt([r["truth"][truth_key] for r in runs]))
        cols.append(fmt([r["truth"]["rel_rmse"] for r in runs]))
        print(f"| {name} | " + " | ".join(cols) + " |")


def label(est: str, om: str) -> str:
    return est if om == "auto" else f"{est}, optimizer_model=sgd"


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="independent data/init/schedule draws per setup")
    ap.add_argument("--quick", action="store_true", help="one seed")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (these problems are too small to gain from more)"
    )
    ap.add_argument("--setups", nargs="*", default=None, help=f"subset of {[s.name for s in SETUPS]}")
    args = ap.parse_args()
    seeds = 1 if args.quick else args.seeds

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    setups = [s for s in SETUPS if args.setups is None or s.name in args.setups]
    started = time.perf_counter()
    table: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    far: dict[tuple[str, str, str], tuple] = {}
    loo_scale: dict[str, tuple[int, float, float]] = {}
    timing: dict[str, tuple[float, float]] = {}
    audits: dict[str, list[dict]] = {}
    for setup in setups:
        t_loo = t_track = 0.0
        for seed in range(seeds):
            res, loo, tl, tt, audit = run_setup(setup, seed)
            audits.setdefault(setup.name, []).append(audit)
            t_loo, t_track = t_loo + tl, t_track + tt
            for (est, om), (m, f) in res.items():
                table.setdefault((setup.name, est, om), []).append(m)
                if seed == 0:
                    far[(setup.name, est, om)] = f
            if seed == 0:
                loo_scale[setup.name] = (len(loo), float(loo.abs().median()), float(loo.abs().max()))
        timing[setup.name] = (t_loo, t_track)
        print(f"# done {setup.name} ({seeds} seed(s)): LOO {t_loo:.1f} s, tracked runs {t_track:.1f} s", flush=True)

    print()
    print(
        f"## Faithfulness to exact leave-one-out (float64, torch {torch.__version__}, {seeds} seed(s),"
        f" {torch.get_num_threads()} thread(s))"
    )
    print()
    for setup in setups:
        print(f"- **{setup.name}**: {setup.description}")
    print()
    print("Values: mean ± standard deviation over seeds (Spearman, Kendall τ, Pearson: higher is better;")
    print("relative RMSE = ‖s − loo‖ / ‖loo‖: lower is better).")
    print()
    print("| setup | estimator | Spearman | Kendall τ | Pearson | rel. RMSE |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, est, om), ms in table.items():
        cols = [fmt([m[key] for m in ms]) for key in ("spearman", "kendall", "pearson", "rel_rmse")]
        print(f"| {name} | {label(est, om)} | " + " | ".join(cols) + " |")

    print_audits(audits)
    print()
    print("## Samples far off (first seed)")
    print()
    print("Per training sample, err = |s − loo|. `> 3·med` counts samples with err above 3 × the median err;")
    print("`> ½·rms` counts samples with err above half the RMS of the true scores (an error as large as a")
    print("typical score). The three largest errors are listed as `id: loo → estimate`. n, and the median /")
    print("max |loo| of the setup, are in the first column.")
    print()
    print("| setup (n; median / max abs loo) | estimator | > 3·med | > ½·rms | largest errors |")
    print("|---|---|---:|---:|---|")
    for (name, est, om), (n_med, n_scale, worst) in far.items():
        n, med, mx = loo_scale[name]
        listed = "; ".join(f"{j}: {lo:+.2e} → {s:+.2e}" for j, lo, s in worst)
        print(f"| {name} ({n}; {med:.1e} / {mx:.1e}) | {label(est, om)} | {n_med} | {n_scale} | {listed} |")
    print()
    total = time.perf_counter() - started
    print(
        "Runtime: "
        + ", ".join(f"{n} LOO {a:.1f} s + tracked {b:.1f} s" for n, (a, b) in timing.items())
        + f"; total {total:.0f} s."
    )


if __name__ == "__main__":
    main()
