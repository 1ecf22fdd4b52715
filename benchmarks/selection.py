"""Online versus offline data selection by influence, on data with flipped labels (issue 12).

For each data set, label-noise rate and seed, an MLP (AdamW) is trained for E epochs on the same shuffled
batches in every variant; a removed sample's rows are dropped from its batches (``ExcludeSamples``), so
every variant takes the same optimizer steps (the compute budget of training is the same E epochs; the
offline recipe trains twice, the tracked full run and the retraining run):

- ``none``: no selection (this run also carries an ``"acc"`` and a ``"tracin"`` tracker, windows per epoch);
- ``random``: the budget of random samples removed from the start;
- ``offline <est>``: the budget of samples most harmful over the whole ``none`` run removed, then retrained
  from the same initial weights (``offline_selection``'s recipe);
- ``online <est> K=k (by)``: ``InfluenceDataSelector`` at every k-epoch window of one tracked run, ranking by
  the window's scores or by the influence accumulated so far (``by=``); each of the E/k − 1 boundaries
  before the end may remove budget/(E/k − 1), under a cap of the whole budget.

The budget is the number of flipped labels. Reported: clean test accuracy and loss (mean ± std over seeds),
the samples removed and the share of them that were flipped; then the detection quality of every window of
the ``none`` run (AUROC of flipped vs clean, and precision at the budget, with the signed score −s and with
|s|). Sign: s = f(θ_-j) − f(θ) on the clean validation loss; negative = harmful.

Run:  python benchmarks/selection.py              (5 seeds, 3 settings; ~20 min on 2 idle CPU cores)
      python benchmarks/selection.py --quick      (1 seed, digits 10% only, fewer epochs)
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc

from lightning_influence import (
    ExcludeSamples,
    IndexedDataset,
    InfluenceDataSelector,
    InfluenceTracker,
    most_harmful_ids,
)
from lightning_influence.testing import TinyClassifier, noisy_label_splits

SETTINGS = {  # name: (loader, train, val, hidden)
    "digits": (load_digits, 500, 300, 32),
    "breast_cancer": (load_breast_cancer, 300, 100, 16),
}


def load(name: str, flip: float, seed: int) -> dict[str, torch.Tensor]:
    loader, n_train, n_val, _ = SETTINGS[name]
    x, y = loader(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)  # standardised features
    return noisy_label_splits(x, torch.tensor(y, dtype=torch.long), n_train, n_val, flip, seed)


def make_net(name: str, data: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    classes = int(data["y_te"].max()) + 1
    hidden = SETTINGS[name][3]
    return nn.Sequential(nn.Linear(data["x_tr"].shape[1], hidden), nn.Tanh(), nn.Linear(hidden, classes))


def adamw(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)


def train(net: nn.Module, data: dict, args, seed: int, callbacks=()) -> tuple[nn.Module, float]:
    """One run of E epochs on the seed's batch order; returns the trained net and the seconds it took."""
    module = TinyClassifier(copy.deepcopy(net), adamw)
    loader = DataLoader(
        IndexedDataset(TensorDataset(data["x_tr"], data["y_tr"])), batch_size=args.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, callbacks=list(callbacks),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, loader)
    return module.net, time.perf_counter() - start


@torch.no_grad()
def test_metrics(net: nn.Module, data: dict) -> tuple[float, float]:
    logits = net(data["x_te"])
    return float((logits.argmax(1) == data["y_te"]).float().mean()), float(F.cross_entropy(logits, data["y_te"]))


def by_id(result, n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.float64)
    out[result.sample_ids] = result.scores.to(torch.float64)
    return out


def detection(scores: torch.Tensor, flipped: torch.Tensor, budget: int) -> dict[str, float]:
    """AUROC and precision at the budget, ranking by harm −s ("signed") and by |s| ("abs")."""
    out = {}
    for kind, rank in (("signed", -scores), ("abs", scores.abs())):
        out[f"auroc_{kind}"] = float(binary_auroc(rank, flipped.long()))
        out[f"prec_{kind}"] = float(flipped[torch.topk(rank, budget).indices].float().mean())
    return out


def baseline_run(name: str, data: dict, net: nn.Module, args, seed: int, budget: int) -> tuple[dict, dict]:
    """The ``none`` run with an acc and a tracin tracker: its results, and the per-window detection rows."""
    query = (data["x_va"], data["y_va"])
    trackers = {est: InfluenceTracker(estimator=est, queries={"val": query}, window_every_n_epochs=1,
                                      write_artifacts=False, name=est) for est in ("acc", "tracin")}  # fmt: skip
    trained, seconds = train(net, data, args, seed, trackers.values())
    results = {"none": (*test_metrics(trained, data), 0, 0.0, seconds)}
    n, flipped, windows = len(data["y_tr"]), data["flipped"], {}
    for est, tracker in trackers.items():
        full = tracker.influence("val")
        windows[(est, "full run")] = detection(by_id(full, n), flipped, budget)
        for w in tracker.windows("val"):
            windows[(est, f"epoch {w.epoch + 1}")] = detection(by_id(w, n), flipped, budget)
        drop = most_harmful_ids(full, budget)
        trained, retrain_seconds = train(net, data, args, seed, [ExcludeSamples(drop)])
        share = float(flipped[drop].float().mean()) if drop.numel() else 0.0
        results[f"offline {est}"] = (*test_metrics(trained, data), drop.numel(), share, seconds + retrain_seconds)
    return results, windows


def online_run(data: dict, net: nn.Module, args, seed: int, est: str, k: int, flip: float, by: str) -> tuple:
    acting = args.epochs // k - 1  # boundaries before the end of the run
    tracker = InfluenceTracker(
        estimator=est, queries={"val": (data["x_va"], data["y_va"])}, window_every_n_epochs=k, write_artifacts=False
    )
    selector = InfluenceDataSelector(tracker, "val", fraction=flip / acting, max_fraction=flip, by=by)
    trained, seconds = train(net, data, args, seed, [tracker, selector])
    removed = selector.removed
    share = float(data["flipped"][removed].float().mean()) if removed.numel() else 0.0
    return (*test_metrics(trained, data), removed.numel(), share, seconds)


def run_setting(name: str, flip: float, seed: int, args) -> tuple[dict, dict]:
    data = load(name, flip, seed)
    net = make_net(name, data, seed)
    budget = int(data["flipped"].sum())
    results, windows = baseline_run(name, data, net, args, seed, budget)
    gen = torch.Generator().manual_seed(1000 + seed)
    drop = torch.randperm(len(data["y_tr"]), generator=gen)[:budget]
    trained, seconds = train(net, data, args, seed, [ExcludeSamples(drop)])
    results["random"] = (*test_metrics(trained, data), budget, float(data["flipped"][drop].float().mean()), seconds)
    for est in ("acc", "tracin"):
        for by in ("window", "cumulative"):
            for k in args.horizons:
                results[f"online {est} K={k} ({by})"] = online_run(data, net, args, seed, est, k, flip, by)
    return results, windows


def mean_std(values: list[float], fmt: str = ".3f") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"


def print_results(title: str, runs: list[dict]) -> None:
    print(f"\n### {title}\n")
    print("| variant | test accuracy | test loss | removed | flipped among removed | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in runs[0]:
        cols = list(zip(*(run[variant] for run in runs)))
        acc, loss, removed, share, secs = cols
        print(f"| {variant} | {mean_std(acc)} | {mean_std(loss)} | {statistics.mean(removed):.0f} |"
              f" {mean_std(share, '.2f')} | {statistics.mean(secs):.1f} |")  # fmt: skip


def print_windows(title: str, runs: list[dict]) -> None:
    print(f"\n#### Detection by window: {title}\n")
    print("| ranking | AUROC −s | AUROC abs(s) | precision@budget −s | precision@budget abs(s) |")
    print("|---|---:|---:|---:|---:|")
    for key in runs[0]:
        cols = {m: [run[key][m] for run in runs] for m in runs[0][key]}
        print(f"| {key[0]}, {key[1]} | {mean_std(cols['auroc_signed'])} | {mean_std(cols['auroc_abs'])} |"
              f" {mean_std(cols['prec_signed'], '.2f')} | {mean_std(cols['prec_abs'], '.2f')} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--horizons", type=int, nargs="+", default=[1, 2, 4], help="K in epochs")
    parser.add_argument("--settings", nargs="+", default=["digits:0.1", "digits:0.3", "breast_cancer:0.1"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.settings = 1, ["digits:0.1"]
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_influence").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print(f"selection: MLP, AdamW (lr 3e-3, wd 1e-2), {args.epochs} epochs, batch {args.batch_size},"
          f" seeds 0..{args.seeds - 1}, K in epochs {args.horizons}")  # fmt: skip
    start = time.perf_counter()
    for setting in args.settings:
        name, flip = setting.split(":")
        pairs = [run_setting(name, float(flip), seed, args) for seed in range(args.seeds)]
        title = f"{name}, {float(flip):.0%} of training labels flipped"
        print_results(title, [p[0] for p in pairs])
        print_windows(title, [p[1] for p in pairs])
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
