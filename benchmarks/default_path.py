"""The default path on a digits CNN: what ``InfluenceTracker(queries=...)`` costs and finds, against a plain fit.

1,000 of scikit-learn's digits (no download), 10% of the training labels flipped, a small tanh CNN (≈ 3.8k
parameters), AdamW, batch 64, float32. Times a plain fit, the same fit with ``InfluenceTracker(queries={"val": ...},
window_every_n_epochs=1)`` on its default path (the run recorded, 16 samples live, one adjoint replay at the end of
fit that scores every sample on every window), and the in-run self-influence of every sample after it; then the
AUROC with which each finds the flipped labels (self-influence: larger = flipped; harm: more negative = flipped;
torchmetrics' ``binary_auroc``). Prints a markdown table.

    python benchmarks/default_path.py            # ≈ 1-2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from typing import Callable

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc

from lightning_influence import IndexedDataset, InfluenceTracker
from lightning_influence.testing import TinyClassifier


def digits(n_train: int, flip: float, seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    train, val = order[:n_train], order[n_train : n_train + 300]
    y_train = y[train].clone()
    flipped = torch.randperm(n_train, generator=gen)[: int(flip * n_train)]
    y_train[flipped] = (y_train[flipped] + torch.randint(1, 10, (len(flipped),), generator=gen)) % 10
    is_flipped = torch.zeros(n_train, dtype=torch.bool)
    is_flipped[flipped] = True
    return (x[train], y_train), (x[val], y[val]), is_flipped


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.Tanh(), nn.Linear(32, 10),
    )  # fmt: skip


def fit(
    train, epochs: int, tracker: InfluenceTracker | None, net: Callable[[], nn.Module] = cnn, batch_size: int = 64
) -> tuple[TinyClassifier, float]:
    """A digits-style fit (AdamW lr 3e-3, weight decay 1e-2, the batch order seeded 1) of ``net()``, with ``tracker``
    if any: the trained module and the fit's seconds. The other benchmarks train through it too."""
    module = TinyClassifier(net(), lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=1e-2))
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[tracker] if tracker else [])  # fmt: skip
    loader = DataLoader(IndexedDataset(TensorDataset(*train)), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, loader)
    return module, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    train, val, flipped = digits(args.train, 0.1)
    fit(train, 1, None)  # warm-up: the first fit of a process pays for imports and first calls
    _, plain = fit(train, args.epochs, None)
    with tempfile.TemporaryDirectory() as folder:
        tracker = InfluenceTracker(queries={"val": val}, window_every_n_epochs=1, dirpath=folder)
        _, default = fit(train, args.epochs, tracker)
        started = time.perf_counter()
        own = tracker.self_influence()
        self_s = time.perf_counter() - started
        harm = tracker.influence("val")  # read back: replayed at the end of fit
        params = sum(p.numel() for p in cnn().parameters())
        print(f"digits CNN ({params} parameters), {args.train} samples (10% flipped), {args.epochs} epochs, AdamW,"
              f" float32, {torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
        print("\n| | seconds | × plain fit |\n|---|---|---|")
        print(f"| plain fit | {plain:.1f} | 1.0 |")
        print(f"| default fit (record, 16 live, end-of-fit replay) | {default:.1f} | {default / plain:.1f} |")
        print(f"| self-influence of every sample (one forward replay) | {self_s:.1f} | {self_s / plain:.1f} |")
        print(f"| replays run (end of fit + self-influence) | {tracker.replays} | |")
        ids = harm.sample_ids
        auroc_harm = binary_auroc(-harm.scores.float(), flipped[ids].long())
        auroc_self = binary_auroc(own.scores.float(), flipped[own.sample_ids].long())
        print(f"\nflipped-label AUROC: self-influence {float(auroc_self):.3f}, harm to the validation loss"
              f" {float(auroc_harm):.3f} (every one of {len(ids)} samples scored)")  # fmt: skip


if __name__ == "__main__":
    main()
