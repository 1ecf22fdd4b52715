"""The per-step update of the stacked accumulative influence states (SPEC §3).

For the real batch B_t at pre-step parameters θ_t, every tracked sample j's perturbation of the
batch gradient is

    δg_j = H δθ_j − 1_j (1/|B_t|) (g_j + c · H_j δθ_j)

with H the Hessian of the real batch loss (one vectorised HVP over all k states, chunked), g_j and
H_j the sample's own gradient and Hessian (only for the tracked samples present in the batch), and
c = 1 for ``"acc"`` (leave-k-out transition), c = 0 for ``"first-order"``. The optimizer model then
advances every state block in place. ``"tracin"`` keeps no states: it accumulates
(η/|B|)⟨∇q(θ_t), g_j(θ_t)⟩ for registered query gradients. Nothing here knows Lightning.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_influence.functional import FunctionalLoss
from lightning_influence.optimizers import OptimizerJacobian, OptimizerStep

ESTIMATORS = ("acc", "first-order", "tracin")

class NonFiniteInfluenceError(FloatingPointError):
    """NaN or inf appeared in the influence states."""

class InfluenceEngine:
    """Holds the stacked states (``states[block]: Tensor[k, p]``) and advances them one step at a time.

    Args:
        loss: the functional batch / per-sample loss.
        jacobian: the optimizer model (decides the state blocks).
        num_tracked: k, the number of tracked samples (rows).
        estimator: ``"acc"`` | ``"first-order"`` | ``"tracin"``.
        chunk_size: rows per vectorised HVP call (bounds the HVP's working memory).
        dtype, device: of the states; the parameters' own dtype is the natural choice.
    """

    def __init__(
        self,
        loss: FunctionalLoss,
        jacobian: OptimizerJacobian,
        num_tracked: int,
        estimator: str,
        chunk_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
        self.loss = loss
        self.jacobian = jacobian
        self.estimator = estimator
        self.chunk_size = max(1, int(chunk_size))
        p = loss.layout.numel
        self.states: dict[str, torch.Tensor] = {}
        if estimator != "tracin":
            self.states = {b: torch.zeros(num_tracked, p, dtype=dtype, device=device) for b in jacobian.blocks}
        # tracin: one running score vector Tensor[k] per registered query name
        self.tracin_scores: dict[str, torch.Tensor] = {}
        self._k, self._dtype, self._device = num_tracked, dtype, device

    @property
    def num_tracked(self) -> int:
        return self._k

    @property
    def theta(self) -> torch.Tensor:
        """δθ for every tracked sample: ``Tensor[k, p]``."""
        return self.states["theta"]

    def step(
        self,
        batch: Any,
        batch_size: int,
        state_rows: torch.Tensor,
        batch_rows: torch.Tensor,
        opt_step: OptimizerStep,
        frozen: dict[str, torch.Tensor] | None = None,
        tracin_query_grads: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Advance the states over one real optimizer step.

        Args:
            batch: the batch the optimizer consumed (as the loss function takes it).
            batch_size: |B_t|, the denominator of the batch mean.
            state_rows / batch_rows: ``LongTensor[m]``; tracked sample ``state_rows[i]`` sits at row
                ``batch_rows[i]`` of the batch.
            opt_step: the factual step (θ_t, gradient, hyper-parameters, post-step moments).
            frozen: values of the model's untracked parameters at θ_t.
            tracin_query_grads: for ``"tracin"``, ``{name: ∇q(θ_t): Tensor[p]}``.

        Returns:
            the gradient of the batch loss at θ_t as the tracker computes it (``Tensor[p]``), for
            the self-check; ``None`` for ``"tracin"``.
        """
        theta_t = opt_step.theta
        dtype = self._dtype
        if self.estimator == "tracin":
            if state_rows.numel() and tracin_query_grads:
                g = self.loss.sample_gradients(theta_t, batch, batch_rows.to(theta_t.device), batch_size, frozen)
                scaled = g * (opt_step.lr_vector() / batch_size)  # [m, p]
                for name, q in tracin_query_grads.items():
                    scores = self.tracin_scores.setdefault(name, torch.zeros(self._k, dtype=dtype, device=self._device))
                    scores.index_add_(0, state_rows.to(self._device), (scaled @ q).to(dtype))
            return None

        grad_t, hvp = self.loss.gradient_and_hvp(theta_t, batch, frozen)
        self.loss.check_batch_size(batch_size)
        # Source terms of the tracked samples present in the batch, from their pre-step δθ:
        # (1/|B|)(g_j + c·H_j δθ_j), Tensor[m, p].
        source = None
        if state_rows.numel():
            rows_dev = state_rows.to(self._device)
            b_rows = batch_rows.to(theta_t.device)
            if self.estimator == "acc":
                g_j, h_j = self.loss.sample_gradients_and_hvps(
                    theta_t, batch, b_rows, batch_size, self.theta[rows_dev].to(theta_t.dtype), frozen
                )
                source = (g_j + h_j) / batch_size
            else:
                source = self.loss.sample_gradients(theta_t, batch, b_rows, batch_size, frozen) / batch_size
            source = source.to(dtype)
        k = self._k
        for start in range(0, k, self.chunk_size):
            stop = min(start + self.chunk_size, k)
            chunk = {b: s[start:stop] for b, s in self.states.items()}
            delta_g = hvp(chunk["theta"].to(theta_t.dtype)).to(dtype)
            if source is not None:
                inside = (state_rows >= start) & (state_rows < stop)
                if inside.any():
                    delta_g.index_add_(0, (state_rows[inside] - start).to(self._device), source[inside.to(source.device)], alpha=-1)
            self.jacobian.advance(chunk, delta_g, opt_step, exact=self.estimator == "acc")
        return grad_t

    def check_finite(self, step_index: int, sample_ids: torch.Tensor) -> None:
        """Raise :class:`NonFiniteInfluenceError` naming the step and the first bad samples."""
        for block, state in self.states.items():
            if torch.isfinite(state.sum()):  # one reduction, no [k, p] mask, in the common case
                continue
            bad = ~torch.isfinite(state).all(dim=1)
            if bad.any():
                ids = sample_ids[bad.nonzero().flatten().cpu()].tolist()
                raise NonFiniteInfluenceError(
                    f"NaN/inf appeared in the influence state {block!r} at optimizer step {step_index} for sample ids"
                    f" {ids[:10]}. Training itself is likely diverging (check the loss), or the learning rate is too"
                    " large for the linearisation; lower it or track in float64 (precision='64-true')."
                )

    def project(self, query_grad: torch.Tensor) -> torch.Tensor:
        """Scores ``⟨∇q, δθ_j⟩`` for every tracked sample: ``Tensor[k]`` (or ``Tensor[k, n]`` for
        query gradients ``Tensor[n, p]``); the sign of SPEC §2 (negative = harmful)."""
        q = query_grad.to(self.theta.dtype)
        return self.theta @ q if q.dim() == 1 else self.theta @ q.T

    def state_dict(self) -> dict[str, Any]:
        return {"states": dict(self.states), "tracin_scores": dict(self.tracin_scores)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for b, s in state["states"].items():
            self.states[b].copy_(s)
        self.tracin_scores = {k: v.to(self._device) for k, v in state["tracin_scores"].items()}

def chunk_rows_for_budget(num_params: int, itemsize: int, budget_bytes: int, k: int) -> int:
    """Rows per HVP chunk so that the chunk's vectors and their intermediates (≈ 6 × p per row)
    fit in ``budget_bytes``."""
    per_row = max(1, 6 * num_params * itemsize)
    return max(1, min(k, budget_bytes // per_row))
