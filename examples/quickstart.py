"""Quickstart: which training samples help or hurt a digits classifier's validation loss?

Trains a small MLP on scikit-learn's digits (shipped with scikit-learn, no download) with AdamW and
an ``InfluenceTracker`` on its default path: the run is recorded, a few samples are tracked live for
TensorBoard, and at the end of fit one adjoint replay scores every training sample. It writes
TensorBoard logs and prints the most harmful and most helpful training samples for the validation
loss, and the samples with the largest self-influence. A few training labels are flipped on purpose,
so you can see whether the harmful end of the ranking, and self-influence, find them.

    python examples/quickstart.py                 # ~1 minute on 2 CPU cores
    tensorboard --logdir influence_logs           # training curves + influence per epoch window

Sign convention: score = predicted change of the validation loss if the sample were removed.
Negative = harmful (removing it lowers the loss), positive = helpful.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, InfluenceTracker
from lightning_influence.testing import noisy_label_splits


class DigitsMLP(pl.LightningModule):
    def __init__(self, lr: float = 3e-3, weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def per_sample_loss(self, batch) -> torch.Tensor:
        """Tensor[B] of per-sample losses; their mean is the training loss (the tracker checks it)."""
        x, y = batch[0], batch[1]
        return F.cross_entropy(self.net(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_sample_loss(batch).mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def digits_splits(n_train: int, n_val: int, flip_fraction: float, seed: int):
    """(x, y) for training (``flip_fraction`` of its labels flipped) and validation, and the flipped ids."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    data = noisy_label_splits(x, torch.tensor(y, dtype=torch.long), n_train, n_val, flip_fraction, seed)
    flipped = set(data["flipped"].nonzero().flatten().tolist())
    return (data["x_tr"], data["y_tr"]), (data["x_va"], data["y_va"]), flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-val", type=int, default=400)
    parser.add_argument("--flip", type=float, default=0.03, help="fraction of training labels flipped on purpose")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--logdir", default="influence_logs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed, verbose=False)
    (x_tr, y_tr), (x_va, y_va), flipped = digits_splits(args.n_train, args.n_val, args.flip, args.seed)
    # IndexedDataset makes each batch (x, y, ids): the tracker needs to know which samples a batch holds.
    train_loader = DataLoader(IndexedDataset(TensorDataset(x_tr, y_tr)), batch_size=64, shuffle=True)
    val_loader = DataLoader(TensorDataset(x_va, y_va), batch_size=200)

    # the default path: the run is recorded and, at the end of fit, replayed once to score every training sample
    # on the validation loss, per epoch window (logged under influence/all_samples/val/*); 16 samples are tracked
    # live meanwhile (influence/val/*). Everything is written to <log_dir>/influence as well.
    tracker = InfluenceTracker(queries={"val": val_loader}, window_every_n_epochs=1)
    logger = TensorBoardLogger(args.logdir, name="quickstart")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[tracker],
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
    )
    trainer.fit(DigitsMLP(), train_loader, val_loader)

    result = tracker.influence("val")  # every sample; f = mean validation loss over the whole run

    def show(title, part):
        print(f"\n{title} (score = Δ val loss if removed; negative = harmful)")
        print(f"{'sample':>8} {'label':>6} {'flipped':>8} {'score':>12}")
        for sid, score in part:
            print(f"{sid:>8} {int(y_tr[sid]):>6} {'yes' if sid in flipped else '':>8} {score:>12.3e}")

    harmful, helpful = result.most_harmful(args.top), result.most_helpful(args.top)
    show(f"Most harmful {args.top} training samples", harmful)
    show(f"Most helpful {args.top} training samples", helpful)
    hits = sum(sid in flipped for sid in harmful.sample_ids.tolist())
    print(
        f"\n{hits} of the {len(harmful)} most harmful samples have a flipped label"
        f" ({len(flipped)} of {args.n_train} training labels were flipped, {len(flipped) / args.n_train:.0%})."
    )
    own = tracker.self_influence()  # each sample's in-run influence on its own loss: large = memorised
    top = own.most_helpful(args.top)
    hits = sum(sid in flipped for sid in top.sample_ids.tolist())
    print(f"{hits} of the {len(top)} samples with the largest self-influence have a flipped label.")
    patterns = tracker.patterns("val").counts()
    windows = len(tracker.windows("val"))
    print(f"Influence dynamics of all {len(result.sample_ids)} samples over {windows} epoch windows: {patterns}")
    print(f"TensorBoard logs: {logger.log_dir}  (tensorboard --logdir {args.logdir}; influence/all_samples/val/*)")


if __name__ == "__main__":
    main()
