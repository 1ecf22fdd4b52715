"""The estimators behind one interface, and how one is chosen and sized.

An estimator consumes one :class:`~lightning_influence.records.StepRecord` per real optimizer step
(plus the tracked rows of its micro-batches) and answers queries with scores of the tracked samples:

- :class:`~lightning_influence.engine.InfluenceEngine` (``"acc"``, ``"first-order"``): per-sample states
  propagated through the step; a query is a projection ⟨∇q, δθ_j⟩;
- :class:`~lightning_influence.tracin.TracInAccumulator` (``"tracin"``): no states; running sums on the
  registered queries only.

Sign of every score: f(θ_-j) − f(θ), negative = harmful. Nothing here knows Lightning.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from lightning_influence.records import MicroBatch, StepRecord

Reduce = Callable[[torch.Tensor], torch.Tensor]
QueryGradient = Callable[[], torch.Tensor]
"""Computes ∇q(θ) at the parameters of the moment it is called for: ``Tensor[p]`` (or ``Tensor[n, p]``)."""


class Estimator:
    """Base class. ``num_tracked`` = k; scores are ``Tensor[k]`` in tracked-row order."""

    name: str = ""
    num_tracked: int = 0

    def book(
        self, record: StepRecord, parts: Sequence[MicroBatch], reduce: Reduce | None = None
    ) -> torch.Tensor | None:
        """Consume one optimizer step. ``parts``: the tracked rows of this process's micro-batches.
        Returns the step gradient as the estimator recomputed it (``Tensor[p]``, for the self-check), or None."""
        raise NotImplementedError

    def totals(self, query: str, gradient: QueryGradient) -> torch.Tensor:
        """I(s) = the accumulated scores ``Tensor[k]`` of registered query ``query`` at the current boundary."""
        raise NotImplementedError

    def answer(self, gradient: torch.Tensor) -> torch.Tensor:
        """Scores ``Tensor[k]`` (``Tensor[k, n]`` for ``Tensor[n, p]``) of an arbitrary query's gradient at θ_T."""
        raise ValueError(
            f"estimator={self.name!r} only answers registered queries: pass the name given in queries={{...}}."
        )

    def check_finite(self, step: int, sample_ids: torch.Tensor) -> None:
        """Raise :class:`~lightning_influence.errors.NonFiniteInfluenceError` on NaN/inf."""

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class NoStates(Estimator):
    """No tracked sample (``track=()`` while recording the trajectory): nothing to propagate, empty scores."""

    name = "none"

    def __init__(self, dtype: torch.dtype) -> None:
        self._dtype = dtype

    def book(self, record: StepRecord, parts: Sequence[MicroBatch], reduce: Reduce | None = None) -> None:
        return None

    def totals(self, query: str, gradient: QueryGradient) -> torch.Tensor:
        return torch.zeros(0, dtype=self._dtype)

    def answer(self, gradient: torch.Tensor) -> torch.Tensor:
        return torch.zeros((0,) if gradient.dim() == 1 else (0, gradient.shape[0]), dtype=self._dtype)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
