"""Every training sample of a model too large for per-sample forward states, by the adjoint replay.

A CNN with 0.28M parameters trains on 1,400 of scikit-learn's digits (no download), 10% of the
labels flipped. Forward states for every sample would need k × p × 3 numbers (4.4 GiB in float32,
over the tracker's default 4 GiB budget) and 1,400 Hessian-vector products per step. Instead the
tracker records the run (``record_trajectory=True``, ``track=()``: no forward state, recording
costs almost nothing), and after fit an adjoint replay scores every
sample on the validation loss, for the whole run and per epoch window, at a cost that does not
depend on the number of samples. The windows go to TensorBoard; the script prints the most harmful
and most helpful samples and how well the harmful end finds the flipped labels.

    python examples/all_samples.py                 # ~1 minute on 2 CPU cores
    python examples/all_samples.py --quick         # fewer samples and epochs
    tensorboard --logdir all_samples_logs

Sign convention: score = predicted change of the validation loss if the sample were removed.
Negative = harmful, positive = helpful.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc

from lightning_influence import IndexedDataset, InfluenceResult, InfluenceTracker
from lightning_influence.reporting.windows import log_window


class DigitsCNN(pl.LightningModule):
    """Two convolutions and a wide dense layer on 8×8 digit images (LayerNorm-free, no dropout)."""

    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 64),
            nn.Tanh(),
            nn.Linear(64, 10),
        )

    def per_sample_loss(self, batch) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return F.cross_entropy(self.net(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-2)


def digits(n_train: int, flip_fraction: float, seed: int):
    """Train / validation images ``[n, 1, 8, 8]`` with ``flip_fraction`` of the training labels changed."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    tr, va = perm[:n_train], perm[n_train:]
    y_tr = y[tr].clone()
    flipped = torch.randperm(n_train, generator=gen)[: int(flip_fraction * n_train)]
    y_tr[flipped] = (y_tr[flipped] + torch.randint(1, 10, (len(flipped),), generator=gen)) % 10
    return (x[tr], y_tr), (x[va], y[va]), flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400 samples, 2 epochs")
    parser.add_argument("--epochs", type=int, default=None, help="default 3 (quick: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="all_samples_logs")
    args = parser.parse_args()
    n_train, epochs = (400, 2) if args.quick else (1400, args.epochs or 3)
    pl.seed_everything(args.seed, verbose=False)
    (x_tr, y_tr), (x_va, y_va), flipped = digits(n_train, 0.1, args.seed)
    train_loader = DataLoader(IndexedDataset(TensorDataset(x_tr, y_tr)), batch_size=64, shuffle=True)
    val_batch = (x_va, y_va)

    tracker = InfluenceTracker(
        track=(), record_trajectory=True, queries={"val": val_batch}, window_every_n_epochs=1, log_top_k=5
    )
    logger = TensorBoardLogger(args.logdir, name="digits_cnn")
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[tracker], logger=logger, enable_model_summary=False, log_every_n_steps=5
    )
    model = DigitsCNN()
    started = time.perf_counter()
    trainer.fit(model, train_loader)
    train_s = time.perf_counter() - started
    p = sum(q.numel() for q in model.parameters())
    print(f"\nTrained {trainer.global_step} steps in {train_s:.1f} s; p = {p} parameters, n = {n_train} samples.")
    print(f"Forward states for every sample would need {n_train * p * 3 * 4 / 2**30:.1f} GiB; the trajectory:")
    print(f"  {tracker.trajectory_path}")

    started = time.perf_counter()
    windows = tracker.windows("val", all_samples=True)  # one replay: every window boundary swept together
    # windows telescope: their sum is the full run's score, tracker.influence("val", all_samples=True)
    result = InfluenceResult(
        windows[0].sample_ids, torch.stack([w.scores for w in windows]).sum(0), None, "first-order"
    )
    print(f"Replay of every sample: {time.perf_counter() - started:.1f} s for {len(windows)} windows.")
    history = []
    for snapshot in windows:  # the windows of every sample, in TensorBoard
        history.append(snapshot.scores)
        steps = [w.end_step for w in windows[: len(history)]]
        log_window(trainer.loggers, snapshot, torch.stack(history), 5, steps, namespace="influence_all_samples")

    is_flipped = torch.zeros(n_train, dtype=torch.long)
    is_flipped[flipped] = 1
    scores = result.scores.float()
    truth = is_flipped[result.sample_ids]
    signed, magnitude = float(binary_auroc(-scores, truth)), float(binary_auroc(scores.abs(), truth))
    print(f"AUROC for the flipped labels: {signed:.3f} ranking by -score (harmful first), {magnitude:.3f} by |score|")
    for title, part in (("most harmful", result.most_harmful(10)), ("most helpful", result.most_helpful(10))):
        print(f"\n{title} (id, score, label, flipped):")
        for sample_id, score in part:
            mark = "FLIPPED" if is_flipped[sample_id] else ""
            print(f"  {sample_id:5d} {score:+.3e}  label {int(y_tr[sample_id])}  {mark}")
    print(f"\nTensorBoard: tensorboard --logdir {args.logdir}  (influence_all_samples/val/*)")


if __name__ == "__main__":
    main()
