"""The ``"tracin"`` baseline: no propagation and no optimizer model ([concepts.md: One step]).

For every registered query q it accumulates, over the steps in which tracked sample j takes part,

    Σ_t Σ_{m ∋ j} (η_t w_m / |B_m|) ⟨∇q(θ_t), g_j(θ_t)⟩

with η_t the learning rate of each coordinate at that step. It exists so that users and the
benchmarks can see what propagation buys. Nothing here knows Lightning.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from lightning_influence.autodiff.functional import FunctionalLoss
from lightning_influence.estimators.base import Estimator, QueryProbe, Reduce
from lightning_influence.records import MicroBatch, StepRecord

QueryGradients = Callable[[torch.Tensor, dict], dict]
"""``(θ_t: Tensor[p], frozen) -> {name: ∇q(θ_t): Tensor[p]}`` for the registered queries."""


class TracInAccumulator(Estimator):
    """Running TracIn scores ``Tensor[k]`` per registered query.

    Args:
        loss: the functional per-sample loss.
        num_tracked: k.
        query_gradients: the registered queries' gradients at a step's θ_t.
        dtype, device: of the running scores.
    """

    name = "tracin"

    def __init__(
        self,
        loss: FunctionalLoss,
        num_tracked: int,
        query_gradients: QueryGradients,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.loss = loss
        self.num_tracked = num_tracked
        self.query_gradients = query_gradients
        self.scores: dict[str, torch.Tensor] = {}
        self._dtype, self._device = dtype, device

    def book(self, record: StepRecord, parts: Sequence[MicroBatch], reduce: Reduce | None = None) -> None:
        theta_t = record.theta
        grads = self.query_gradients(theta_t, record.frozen)
        increments = {name: torch.zeros(self.num_tracked, dtype=self._dtype, device=self._device) for name in grads}
        lr = record.optimizer.lr_vector()
        for part in parts:
            if not part.state_rows.numel():
                continue
            rows = part.batch_rows.to(theta_t.device)
            g = self.loss.sample_gradients(theta_t, part.batch, rows, part.batch_size, record.frozen)
            scaled = g * (lr * (part.weight / part.batch_size))  # [m, p]
            for name, q in grads.items():
                increments[name].index_add_(0, part.state_rows.to(self._device), (scaled @ q).to(self._dtype))
        for name, inc in increments.items():
            self.scores[name] = self.running(name) + (inc if reduce is None else reduce(inc))
        return None

    def running(self, query: str) -> torch.Tensor:
        """The scores accumulated so far on ``query``: ``Tensor[k]`` (zeros before any step)."""
        return self.scores.get(query, torch.zeros(self.num_tracked, dtype=self._dtype, device=self._device))

    def totals(self, query: str, probe: QueryProbe) -> torch.Tensor:
        return self.running(query)

    def state_dict(self) -> dict[str, Any]:
        return {"tracin_scores": {n: s.detach().cpu().clone() for n, s in self.scores.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = {n: s.to(self._device, self._dtype) for n, s in state["tracin_scores"].items()}
