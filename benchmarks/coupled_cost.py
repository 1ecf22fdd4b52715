"""What the coupled path costs: per-sample terms from the batch's own forward against a forward of each row alone.

A model whose forward draws (dropout) or holds recurrent layers gets its tracked samples' gradients g_r and HVPs
H_r v_r from one forward of the whole batch and backward passes vectorised over the rows ("coupled"). Other models
take one copy of θ per row, with only the forward vmapped over the rows ("per row"). Both compute the same numbers on
a deterministic model; this script times both, per model and number of tracked rows m in a batch of 64, for the
``"acc"`` terms (gradients and HVPs) and the ``"first-order"`` ones (gradients only).

A model with BatchNorm in train mode has no per-row path (a row alone has other batch statistics than in its batch):
its row times the coupled path only. Such a model also moves its running buffers, which are part of the tracked state;
the second table times whole training steps (``InfluenceTracker(track=[...])`` with 8 tracked samples, default
``"acc"``, float32, batch 64, the median of 20 steps after 4 of warm-up) of a BatchNorm CNN with dropout, its
BatchNorm in train mode against the same CNN with its BatchNorm kept in eval mode: with the dropout both take the
coupled path, so the difference is the running-statistics map of each step. Bare runs (no tracker) give the training
step itself.

Times in the first table are ms per call, the best of 5 after a warm-up, on ``--threads`` threads (default 2).

Run:  python benchmarks/coupled_cost.py     (a few minutes on 2 idle CPU cores)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceTracker
from lightning_influence.autodiff.functional import FlatParameters, FunctionalLoss
from lightning_influence.sample_ids import IndexedDataset
from lightning_influence.testing import TinyClassifier, lightning_trainer

BATCH = 64
STEPS, WARMUP, TRACKED = 24, 4, 8  # training-step timing: 24 steps of 64 over 1536 samples, 8 of them tracked


class EvalBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that stays in eval mode (running statistics read, never moved) whatever ``train()`` or a restore
    of saved modes (Lightning sets ``module.training`` directly) asks."""

    training = property(lambda self: False, lambda self, value: None)  # type: ignore[assignment]


def bn_cnn(norm: type[nn.BatchNorm2d] = nn.BatchNorm2d, dropout: float = 0.0) -> nn.Module:
    """The CNN below with BatchNorm2d after each conv (no conv bias: the batch mean would remove it)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), norm(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), norm(16), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(dropout), nn.Linear(16 * 4 * 4, 10))  # fmt: skip


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))  # fmt: skip
    return {
        "mlp (9.6k params)": (mlp, torch.randn(BATCH, 64)),
        "cnn (5.1k params)": (cnn, torch.randn(BATCH, 1, 8, 8)),
        "bn cnn (5.1k params)": (bn_cnn(), torch.randn(BATCH, 1, 8, 8)),
    }


def _best(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def terms_table() -> None:
    """Table 1: the per-sample terms of a batch of 64 by the per-row and the coupled path ("—": no per-row path)."""
    print(f"{'model':20s} {'m':>3s} {'acc: per row':>13s} {'acc: coupled':>13s} {'first-order: per row':>21s}"
          f" {'first-order: coupled':>21s}  (ms per call)")  # fmt: skip
    for name, (net, x) in _models().items():
        layout = FlatParameters.from_groups([list(net.named_parameters())])
        batch = (x, torch.randint(0, 10, (BATCH,)))

        def loss_fn(m, b):
            return F.cross_entropy(m(b[0]), b[1], reduction="none")

        per_row = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        paths = {c: FunctionalLoss(net, loss_fn, layout, coupled=c) for c in (False, True) if per_row or c}
        theta = layout.flatten([p.detach() for p in net.parameters()])
        for m in (1, 4, 16):
            rows, vectors = torch.arange(m), 1e-3 * torch.randn(m, theta.numel())
            acc = {
                c: partial(loss.sample_gradients_and_hvps, theta, batch, rows, BATCH, vectors)
                for c, loss in paths.items()
            }
            first = {c: partial(loss.sample_gradients, theta, batch, rows, BATCH) for c, loss in paths.items()}
            cells = [f"{_best(t[c]):.2f}" if c in t else "—" for t in (acc, first) for c in (False, True)]
            print(f"{name:20s} {m:3d} {cells[0]:>13s} {cells[1]:>13s} {cells[2]:>21s} {cells[3]:>21s}")


class StepTimer(pl.Callback):
    """Wall time between consecutive ``on_train_batch_start`` hooks: one whole training step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.modes: set[bool] = set()  # the BatchNorm's training flag at each step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())
        self.modes.add(pl_module.net[1].training)

    def median_ms(self) -> float:
        return 1e3 * statistics.median(b - a for a, b in zip(self.stamps[WARMUP:-1], self.stamps[WARMUP + 1 :]))


def step_ms(norm: type[nn.BatchNorm2d], tracked: bool) -> float:
    """ms per training step of the BatchNorm CNN with dropout, with or without the tracker."""
    x, y = torch.randn(STEPS * BATCH, 1, 8, 8), torch.randint(0, 10, (STEPS * BATCH,))
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    timer = StepTimer()
    tracker = [InfluenceTracker(track=list(range(TRACKED)), write_artifacts=False)] if tracked else []
    module = TinyClassifier(bn_cnn(norm, dropout=0.1), lambda m: torch.optim.SGD(m.parameters(), lr=0.05))
    lightning_trainer(1, precision="32-true", callbacks=[*tracker, timer]).fit(module, loader)
    assert timer.modes == {norm is nn.BatchNorm2d}  # the mode the row names held at every step
    return timer.median_ms()


def running_stats_table() -> None:
    """Table 2: ms per training step, BatchNorm in train mode (buffers move) against eval mode (buffers frozen)."""
    print(f"\n{'bn cnn + dropout, batch 64':34s} {'bare':>8s} {'tracked':>8s} {'tracker':>8s}  (ms per step)")
    for label, norm in (("BatchNorm train mode", nn.BatchNorm2d), ("BatchNorm eval mode", EvalBatchNorm2d)):
        bare, tracked = step_ms(norm, False), step_ms(norm, True)
        print(f"{label:34s} {bare:8.2f} {tracked:8.2f} {tracked - bare:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(parser.parse_args().threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    terms_table()
    running_stats_table()


if __name__ == "__main__":
    main()
