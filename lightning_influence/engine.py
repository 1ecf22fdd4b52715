"""The per-step update of the stacked accumulative influence states (SPEC §3).

A step's loss is L = Σ_m w_m mean_{i∈B_m} ℓ_i over its micro-batches B_m (one micro-batch with
w = 1 normally; w_m = 1/N under gradient accumulation of N; divided again by the world size under
data parallelism, each process holding its own micro-batches). At pre-step parameters θ_t, every
tracked sample j's perturbation of the step gradient is

    δg_j = H δθ_j − Σ_{m ∋ j} (w_m/|B_m|) (g_j + c · H_j δθ_j)

with H the Hessian of L (one vectorised HVP over all k states, chunked), g_j and H_j the sample's
own gradient and Hessian (only for the tracked samples present in the step), and c = 1 for
``"acc"`` (leave-k-out transition), c = 0 for ``"first-order"``. Gradient clipping, if any, maps
δg (:mod:`~lightning_influence.clipping`); the optimizer model then advances every state block
in place. ``"tracin"`` keeps no states: it accumulates (η w_m/|B_m|)⟨∇q(θ_t), g_j(θ_t)⟩ for
registered query gradients. Nothing here knows Lightning or torch.distributed: a ``reduce``
callable sums a tensor over processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lightning_influence.clipping import GradientClip
from lightning_influence.functional import FunctionalLoss
from lightning_influence.optimizers import OptimizerJacobian, OptimizerStep

ESTIMATORS = ("acc", "first-order", "tracin")

class NonFiniteInfluenceError(FloatingPointError):
    """NaN or inf appeared in the influence states."""


@dataclass
class MicroBatch:
    """One micro-batch of an optimizer step.

    ``state_rows`` / ``batch_rows`` (``LongTensor[m]``): tracked sample ``state_rows[i]`` sits at row
    ``batch_rows[i]`` of ``batch``; ``batch_size`` = |B_m|, the denominator of its mean;
    ``weight`` = w_m, its mean loss's factor in the step loss.
    """

    batch: Any
    batch_size: int
    state_rows: torch.Tensor
    batch_rows: torch.Tensor
    weight: float = 1.0


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
        parts: Sequence[MicroBatch],
        opt_step: OptimizerStep,
        frozen: dict[str, torch.Tensor] | None = None,
        tracin_query_grads: dict[str, torch.Tensor] | None = None,
        clip: GradientClip | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Advance the states over one real optimizer step.

        Args:
            parts: the step's micro-batches held by this process.
            opt_step: the factual step (θ_t, the gradient the optimizer consumed, hyper-parameters,
                post-step moments).
            frozen: values of the model's untracked parameters at θ_t.
            tracin_query_grads: for ``"tracin"``, ``{name: ∇q(θ_t): Tensor[p]}``.
            clip: the step's gradient clipping, bound to the unclipped gradient (None: no clipping).
            reduce: sums a tensor over data-parallel processes (None: a single process). Every
                process must call ``step`` with identical states; they stay identical.

        Returns:
            the (unclipped, reduced) gradient of the step loss at θ_t as the tracker computes it
            (``Tensor[p]``), for the self-check; ``None`` for ``"tracin"``.
        """
        theta_t = opt_step.theta
        dtype = self._dtype
        reduce = reduce or (lambda t: t)
        if self.estimator == "tracin":
            if tracin_query_grads:
                increments = {name: torch.zeros(self._k, dtype=dtype, device=self._device) for name in tracin_query_grads}
                lr = opt_step.lr_vector()
                for part in parts:
                    if not part.state_rows.numel():
                        continue
                    g = self.loss.sample_gradients(
                        theta_t, part.batch, part.batch_rows.to(theta_t.device), part.batch_size, frozen
                    )
                    scaled = g * (lr * (part.weight / part.batch_size))  # [m, p]
                    for name, q in tracin_query_grads.items():
                        increments[name].index_add_(0, part.state_rows.to(self._device), (scaled @ q).to(dtype))
                for name, inc in increments.items():
                    scores = self.tracin_scores.setdefault(name, torch.zeros(self._k, dtype=dtype, device=self._device))
                    scores += reduce(inc)
            return None

        grad_t, hvp = self.loss.gradient_and_hvp(theta_t, [p.batch for p in parts], frozen, [p.weight for p in parts])
        for part, num_losses in zip(parts, self.loss.last_batch_sizes):
            self.loss.check_batch_size(part.batch_size, num_losses)
        grad_t = reduce(grad_t)
        # Source terms of the tracked samples present in the step, from their pre-step δθ:
        # (w_m/|B_m|)(g_j + c·H_j δθ_j), Tensor[m, p] per micro-batch.
        rows, sources = [], []
        for part in parts:
            if not part.state_rows.numel():
                continue
            rows_dev = part.state_rows.to(self._device)
            b_rows = part.batch_rows.to(theta_t.device)
            if self.estimator == "acc":
                g_j, h_j = self.loss.sample_gradients_and_hvps(
                    theta_t, part.batch, b_rows, part.batch_size, self.theta[rows_dev].to(theta_t.dtype), frozen
                )
                source = g_j + h_j
            else:
                source = self.loss.sample_gradients(theta_t, part.batch, b_rows, part.batch_size, frozen)
            rows.append(part.state_rows)
            sources.append((source * (part.weight / part.batch_size)).to(dtype))
        state_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        source = torch.cat(sources) if sources else None
        k = self._k
        for start in range(0, k, self.chunk_size):
            stop = min(start + self.chunk_size, k)
            chunk = {b: s[start:stop] for b, s in self.states.items()}
            delta_g = hvp(chunk["theta"].to(theta_t.dtype)).to(dtype)
            if source is not None:
                inside = (state_rows >= start) & (state_rows < stop)
                if inside.any():
                    delta_g.index_add_(0, (state_rows[inside] - start).to(self._device), source[inside.to(source.device)], alpha=-1)
            delta_g = reduce(delta_g)
            if clip is not None:
                delta_g = clip.perturb(delta_g, exact=self.estimator == "acc")
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
