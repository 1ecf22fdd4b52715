"""Shared fixtures: a tiny float64 classification set, a TinyClassifier factory and a quiet Trainer."""

from __future__ import annotations

import warnings
from typing import Callable

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset
from lightning_influence.testing import TinyClassifier, lightning_trainer

NUM_SAMPLES, NUM_FEATURES, NUM_CLASSES = 24, 4, 3


@pytest.fixture(autouse=True)
def _quiet_lightning():
    """Lightning warns about num_workers, small logging intervals etc.; irrelevant on these toy runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        yield


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """``x: Tensor[24, 4]`` float64 and ``y: LongTensor[24]`` in 3 classes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=gen, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,), generator=gen)
    return x, y


@pytest.fixture
def train_set(data) -> IndexedDataset:
    """``(x, y, id)`` items."""
    return IndexedDataset(TensorDataset(*data))


@pytest.fixture
def train_loader(train_set) -> DataLoader:
    """3 batches of 8 ``(x, y, ids)``, fixed order."""
    return DataLoader(train_set, batch_size=8, shuffle=False)


def tiny_net(hidden: int | None = None, seed: int = 0) -> nn.Module:
    """A float64 linear classifier (``hidden=None``) or a one-hidden-layer tanh MLP."""
    torch.manual_seed(seed)
    if hidden is None:
        return nn.Linear(NUM_FEATURES, NUM_CLASSES).double()
    return nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, NUM_CLASSES)).double()


def _sgd(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.1)


@pytest.fixture
def make_model() -> Callable[..., TinyClassifier]:
    """``make_model(make_optimizer=SGD(lr=0.1), hidden=None, cls=TinyClassifier, net=None, **kwargs)``."""

    def factory(
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] = _sgd,
        hidden: int | None = None,
        cls: type[TinyClassifier] = TinyClassifier,
        net: nn.Module | None = None,
        **kwargs,
    ) -> TinyClassifier:
        return cls(net if net is not None else tiny_net(hidden), make_optimizer, **kwargs)

    return factory


@pytest.fixture
def make_trainer() -> Callable[..., pl.Trainer]:
    """``make_trainer(*callbacks, epochs=1, **trainer_kwargs)``: a quiet float64 CPU Trainer."""

    def factory(*callbacks, epochs: int = 1, **kwargs):
        kwargs.setdefault("precision", "64-true")
        return lightning_trainer(epochs, callbacks=list(callbacks), **kwargs)

    return factory


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Trainers without a logger write artifacts under the working directory: keep it per test."""
    monkeypatch.chdir(tmp_path)
