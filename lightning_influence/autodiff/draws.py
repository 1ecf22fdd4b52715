"""The random draws of a training step (dropout masks, any RNG in the forward), captured and replayed.

The counterfactual run draws exactly what the real run drew ([concepts.md: Random draws]): every loss, gradient and
Hessian-vector product the tracker evaluates for a micro-batch is evaluated from the random-stream state its real
forward started from. :class:`RandomDraws` is that state (the CPU generator's and, on a GPU, the CUDA generators'),
captured just before the forward; :class:`DrawnBatch` carries it with the batch to
:class:`~lightning_influence.autodiff.functional.FunctionalLoss`, which replays it around each evaluation inside
``torch.random.fork_rng``: the run's own random stream is never consumed, so a tracked fit ends where the untracked
fit ends. Nothing here knows Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

RANDOM_LAYERS = (nn.modules.dropout._DropoutNd,)
"""Layers whose forward draws from the random stream in training mode (dropout, alpha dropout, their 1-3d forms)."""


@dataclass(frozen=True)
class RandomDraws:
    """The random-stream state one forward started from.

    ``cpu``: ``torch.get_rng_state()`` (``ByteTensor``); ``cuda``: ``{device index: its generator state}`` of the
    CUDA devices the step ran on (empty on the CPU).
    """

    cpu: torch.Tensor
    cuda: tuple[tuple[int, torch.Tensor], ...] = ()

    @classmethod
    def capture(cls, devices: tuple[int, ...] = ()) -> RandomDraws:
        """The state now, of the CPU generator and of the CUDA ``devices``."""
        return cls(torch.get_rng_state(), tuple((d, torch.cuda.get_rng_state(d)) for d in devices))

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the body from this state; the random streams are put back as they were afterwards."""
        with torch.random.fork_rng(devices=[d for d, _ in self.cuda], device_type="cuda"):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda:
                torch.cuda.set_rng_state(state, device)
            yield

    def to_record(self) -> dict[str, Any]:
        """Plain tensors for ``torch.save`` (the trajectory's draws files)."""
        return {"cpu": self.cpu, "cuda": {str(d): s for d, s in self.cuda}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RandomDraws:
        return cls(record["cpu"], tuple((int(d), s) for d, s in record.get("cuda", {}).items()))


@dataclass(frozen=True)
class DrawnBatch:
    """A collated ``batch`` with the random ``draws`` its training forward started from."""

    batch: Any
    draws: RandomDraws


def unwrap(batch: Any) -> Any:
    """The collated batch itself (a :class:`DrawnBatch`'s ``batch``)."""
    return batch.batch if isinstance(batch, DrawnBatch) else batch


def moved(batch: Any, move: Callable[[Any], Any]) -> Any:
    """``move(batch)``; a :class:`DrawnBatch` keeps its draws."""
    return DrawnBatch(move(batch.batch), batch.draws) if isinstance(batch, DrawnBatch) else move(batch)


def needs_batch_forward(module: nn.Module) -> bool:
    """Whether per-sample terms must come from the batch's own forward rather than a forward of each row alone: the
    forward draws (:func:`draws_randomly`), or it holds recurrent layers, which ``vmap`` cannot batch row by row
    (their kernels have no batching rule; ``nn.LSTM``'s inter-layer dropout also draws), or BatchNorm in train mode (a
    row's output depends on the whole batch's statistics)."""
    return draws_randomly(module) or any(
        isinstance(m, nn.RNNBase) or (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training)
        for m in module.modules()
    )


def draws_randomly(module: nn.Module) -> bool:
    """Whether ``module``'s forward, as it is now (train or eval mode), draws from the random stream through a layer
    we know: an active dropout. A random operation elsewhere in the forward is caught by the self-check."""
    return any(isinstance(m, RANDOM_LAYERS) and m.training and getattr(m, "p", 0) > 0 for m in module.modules())
