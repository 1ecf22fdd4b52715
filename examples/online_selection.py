"""Online data selection: drop harmful training samples while the model trains.

A small MLP (AdamW) learns scikit-learn's digits (shipped with scikit-learn, no download) with 10% of the
training labels flipped. An ``InfluenceTracker`` closes a window every K epochs on the clean validation loss,
and an ``InfluenceDataSelector`` placed after it removes, at every boundary, the samples most harmful to
that loss (their rows are dropped from every later batch; nothing in the training loop changes). The same
run without selection, from the same initial weights on the same batches, is the reference.

    python examples/online_selection.py                  # about a minute on 2 CPU cores
    tensorboard --logdir online_selection_logs           # influence/val/selection/*: removed per window, total

Sign convention: score = f(θ_-j) − f(θ) on the validation loss; negative = harmful (removing it helps).
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, InfluenceDataSelector, InfluenceTracker
from lightning_influence.testing import noisy_label_splits


class DigitsMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def per_sample_loss(self, batch) -> torch.Tensor:
        """Tensor[B] of per-sample losses; their mean is the training loss (the tracker checks it)."""
        return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=1e-2)


@torch.no_grad()
def test_metrics(model: DigitsMLP, data: dict) -> str:
    logits = model.net(data["x_te"])
    accuracy = float((logits.argmax(1) == data["y_te"]).float().mean())
    return f"test accuracy {accuracy:.3f}, test loss {float(F.cross_entropy(logits, data['y_te'])):.3f}"


def fit(model: DigitsMLP, data: dict, args, callbacks=(), logger=False) -> DigitsMLP:
    loader = DataLoader(
        IndexedDataset(TensorDataset(data["x_tr"], data["y_tr"])), batch_size=64, shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),  # the same batches in both runs
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=args.epochs, logger=logger, callbacks=list(callbacks), enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=4,
    )  # fmt: skip
    trainer.fit(model, loader)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--k", type=int, default=2, help="look-ahead: a window (and a decision) every k epochs")
    parser.add_argument("--by", choices=["window", "cumulative"], default="cumulative")
    parser.add_argument("--flip", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="online_selection_logs")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning_influence").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)  # standardised pixels
    data = noisy_label_splits(x, torch.tensor(y), n_train=500, n_val=300, flip_fraction=args.flip, seed=args.seed)
    pl.seed_everything(args.seed, verbose=False)
    start = DigitsMLP()

    reference = fit(copy.deepcopy(start), data, args)
    print(f"no selection:     {test_metrics(reference, data)}")

    tracker = InfluenceTracker(queries={"val": (data["x_va"], data["y_va"])}, window_every_n_epochs=args.k)
    acting = args.epochs // args.k - 1  # boundaries before the end of the run
    selector = InfluenceDataSelector(tracker, "val", fraction=args.flip / acting, max_fraction=args.flip, by=args.by)
    logger = TensorBoardLogger(args.logdir, name="online_selection")
    selected = fit(copy.deepcopy(start), data, args, [tracker, selector], logger)
    print(f"online selection: {test_metrics(selected, data)}")

    flipped = data["flipped"][selector.removed]
    print(
        f"\nremoved {selector.removed.numel()} of {len(data['y_tr'])} training samples ({args.by} scores, a decision"
        f" every {args.k} epochs); {int(flipped.sum())} of them had a flipped label"
        f" (the training set has {int(data['flipped'].sum())} flipped labels)."
    )
    for decision in selector.decisions:
        print(" ", decision)
    print(f"\nDecisions: {tracker.artifact_dir}/selection.jsonl; TensorBoard: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
