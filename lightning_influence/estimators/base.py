"""The estimators behind one interface, and how one is chosen and sized.

An estimator consumes one :class:`~lightning_influence.records.StepRecord` per real optimizer step
(plus the tracked rows of its micro-batches) and answers queries with scores of the tracked samples:

- :class:`~lightning_influence.estimators.engine.InfluenceEngine` (``"acc"``, ``"first-order"``): per-sample states
  propagated through the step; a query is a projection ⟨∇q, δθ_j⟩;
- :class:`~lightning_influence.estimators.tracin.TracInAccumulator` (``"tracin"``): no states; running sums on the
  registered queries only.

Sign of every score: f(θ_-j) − f(θ), negative = harmful. Nothing here knows Lightning.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lightning_influence.records import MicroBatch, Reduce, StepRecord

QueryProbe = Any
"""A :class:`~lightning_influence.autodiff.queries.QueryProbe`: one query at the parameters of the moment, which gives
its gradient (``probe.gradient()``, ``probe.example_gradients()``) or counterfactual differences
(``probe.differences(deltas, per_example)``) on demand."""


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

    def totals(self, query: str, probe: QueryProbe) -> torch.Tensor:
        """I(s) = the accumulated scores ``Tensor[k]`` of registered query ``query`` at the current boundary
        (``probe``: that query at the current parameters)."""
        return self.answer(probe)

    def answer(self, probe: QueryProbe, per_example: bool = False) -> torch.Tensor:
        """Scores ``Tensor[k]`` (``Tensor[k, n]`` per query example) of any query at the current parameters."""
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

    def answer(self, probe: QueryProbe, per_example: bool = False) -> torch.Tensor:
        return torch.zeros(0, dtype=self._dtype) if not per_example else probe.example_gradients()[:0].T

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
