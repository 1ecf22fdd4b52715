"""``estimator="exact"``: the counterfactual run itself, per tracked sample ([concepts.md: The exact counterfactual]).

``"acc"`` already applies the optimizer's (and the clip's) own update to each counterfactual state;
its last linear step is δg = H δθ. ``"exact"`` replaces it by the true difference of step gradients,

    δg_j = ∇_θ L_t(θ_t + δθ_j; w with w_j = 0) − ∇_θ L_t(θ_t; w = 1)

(the regulariser R is in both and does not cancel where δθ_j ≠ 0), computed for a chunk of tracked
samples at once by vectorising the batch gradient over parameter replicas θ_t + δθ_j. In exact arithmetic
θ_t + δθ_j is then the counterfactual run of [concepts.md: The counterfactual run], and a query is answered by
evaluating it there: score_j = f(θ_T + δθ_j) − f(θ_T), the true leave-one-out difference. δθ_j stays its own tensor; in
float32 θ + δθ_j rounds, so the precision there is measured (docs/benchmarks.md), not assumed.
Nothing here knows Lightning.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.func import grad

from lightning_influence.autodiff.functional import FunctionalLoss
from lightning_influence.autodiff.per_sample import map_rows
from lightning_influence.estimators.base import QueryProbe, Reduce
from lightning_influence.estimators.engine import InfluenceEngine
from lightning_influence.optimizers import OptimizerJacobian
from lightning_influence.records import MicroBatch, StepRecord


class ExactEngine(InfluenceEngine):
    """Per-sample counterfactual states (``states[block]: Tensor[k, p]``) advanced by the true gradient difference.

    Args: as :class:`~lightning_influence.estimators.engine.InfluenceEngine`; ``chunk_size`` rows are evaluated at once
    (each row is one batch forward and backward at its own parameters, so memory grows with it).
    """

    def __init__(
        self,
        loss: FunctionalLoss,
        jacobian: OptimizerJacobian,
        num_tracked: int,
        chunk_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(loss, jacobian, num_tracked, "acc", chunk_size, dtype, device)
        self.name = "exact"

    def book(self, record: StepRecord, parts: Sequence[MicroBatch], reduce: Reduce | None = None) -> torch.Tensor:
        reduce = reduce or (lambda t: t)
        theta_t, frozen = record.theta, record.frozen
        batches, weights = [p.batch for p in parts], [p.weight for p in parts]
        ones = [torch.ones(p.batch_size, dtype=theta_t.dtype, device=theta_t.device) for p in parts]
        # the factual gradient through the very function the counterfactuals use, so that they cancel exactly
        factual = grad(self.loss.weighted_step_loss)(theta_t, batches, weights, ones, frozen)
        present = torch.zeros(self.num_tracked, dtype=torch.bool)
        for p in parts:
            present[p.state_rows] = True
        buffers = self._factual_buffers(record, batches)
        for start in range(0, self.num_tracked, self.chunk_size):
            stop = min(start + self.chunk_size, self.num_tracked)
            chunk = {b: s[start:stop] for b, s in self.states.items()}
            if buffers is not None:
                self._move_buffers(record, batches, chunk["theta"], slice(start, stop), buffers)  # pre-step δθ
            delta_g = self._gradient_differences(record, parts, chunk["theta"], present[start:stop], start, factual)
            delta_g = reduce(delta_g)
            if record.clip is not None:
                delta_g = record.clip.perturb(delta_g, exact=True)
            self.jacobian.advance(chunk, delta_g, record.optimizer, exact=True)
        return reduce(factual)

    def _factual_buffers(self, record: StepRecord, batches: list) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(u(θ_t), d)`` of the step's running-buffer map, once per step; None when the model moves no buffer."""
        if self.buffer_states is None:
            return None
        with torch.no_grad():
            return self.loss.fold_statistics(record.theta, batches, record.frozen)

    def _move_buffers(
        self, record: StepRecord, batches: list, deltas: torch.Tensor, rows: slice, factual: tuple[torch.Tensor, ...]
    ) -> None:
        """δb ← d ⊙ δb + u(θ_t + δθ) − u(θ_t) for the state ``rows``: each counterfactual's running buffers moved by its
        own forward (:mod:`~lightning_influence.autodiff.running_stats`); ``factual`` = ``(u(θ_t), d)``."""
        assert self.buffer_states is not None  # factual buffers exist only then
        theta_t, frozen = record.theta, record.frozen
        update_t, decay = factual

        def update(delta: torch.Tensor) -> torch.Tensor:
            return self.loss.fold_statistics(theta_t + delta, batches, frozen)[0]

        with torch.no_grad():
            moved = map_rows(update, deltas.to(theta_t.dtype), randomness="same") - update_t
        states = self.buffer_states[rows]
        states.mul_(decay.to(states)).add_(moved.to(states))

    def _gradient_differences(
        self,
        record: StepRecord,
        parts: Sequence[MicroBatch],
        deltas: torch.Tensor,
        present: torch.Tensor,
        start: int,
        factual: torch.Tensor,
    ) -> torch.Tensor:
        """``Tensor[c, p]``: δg for the chunk's rows; exactly 0 for a row whose state is 0 and whose sample is not
        in this process's micro-batches (its counterfactual step is the factual one)."""
        theta_t = record.theta
        out = torch.zeros_like(deltas)
        active = (present.to(deltas.device) | (deltas != 0).any(dim=1)).nonzero().flatten()
        if not active.numel():
            return out
        position = torch.full((deltas.shape[0],), -1, dtype=torch.long)
        position[active.cpu()] = torch.arange(active.numel())
        masks = []  # per micro-batch: Tensor[a, B_m], the sample weights of each active row's counterfactual
        for p in parts:
            mask = torch.ones(active.numel(), p.batch_size, dtype=theta_t.dtype, device=theta_t.device)
            rows = p.state_rows - start
            inside = (rows >= 0) & (rows < deltas.shape[0])
            mask[position[rows[inside]].to(mask.device), p.batch_rows[inside].to(mask.device)] = 0.0  # w_j = 0
            masks.append(mask)
        batches, weights = [p.batch for p in parts], [p.weight for p in parts]

        def counterfactual(delta: torch.Tensor, sample_weights: list[torch.Tensor]) -> torch.Tensor:
            return grad(self.loss.weighted_step_loss)(theta_t + delta, batches, weights, sample_weights, record.frozen)

        shifted = deltas.index_select(0, active).to(theta_t.dtype)
        # every counterfactual replays the batch's own draws (a DrawnBatch restores them inside)
        cf = map_rows(counterfactual, shifted, masks, randomness="same")
        out.index_copy_(0, active, (cf - factual).to(out.dtype))
        return out

    def own_scores(self, probe: QueryProbe, rows: slice) -> torch.Tensor:
        """The loss of each sample at its own counterfactual parameters (and buffers), minus the factual one."""
        buffers = None if self.buffer_states is None else self.buffer_states[rows]
        return probe.differences(self.theta[rows], per_example=True, buffer_deltas=buffers).diagonal()

    def answer(self, probe: QueryProbe, per_example: bool = False) -> torch.Tensor:
        """The true differences f(θ + δθ_j, b + δb_j) − f(θ, b) (b the running buffers, if any): ``Tensor[k]``
        (``Tensor[k, n]`` per query example)."""
        return probe.differences(self.theta, per_example, buffer_deltas=self.buffer_states)
