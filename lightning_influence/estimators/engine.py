"""The per-step update of the stacked accumulative influence states ([concepts.md: One step]).

A step's loss is L = Σ_m w_m mean_{i∈B_m} ℓ_i over its micro-batches B_m (one micro-batch with
w = 1 normally; w_m = 1/N under gradient accumulation of N; divided again by the world size under
data parallelism, each process holding its own micro-batches). At pre-step parameters θ_t, every
tracked sample j's perturbation of the step gradient is

    δg_j = H δθ_j − Σ_{m ∋ j} (w_m/|B_m|) (g_j + c · H_j δθ_j)

with H the Hessian of L (one vectorised HVP over all k states, chunked), g_j and H_j the sample's
own gradient and Hessian (only for the tracked samples present in the step), and c = 1 for
``"acc"`` (leave-k-out transition), c = 0 for ``"first-order"``. Gradient clipping, if any, maps
δg (:mod:`~lightning_influence.optimizers.clipping`); the optimizer model then advances every state block
in place. Nothing here knows Lightning or torch.distributed: a ``reduce`` callable sums a tensor
over processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lightning_influence.autodiff.functional import FunctionalLoss
from lightning_influence.autodiff.hvp_plan import HvpChoice, HvpMethod, StepHvp, choose_hvp
from lightning_influence.errors import NonFiniteInfluenceError
from lightning_influence.estimators.base import Estimator, QueryProbe, Reduce
from lightning_influence.optimizers import OptimizerJacobian, OptimizerStep
from lightning_influence.optimizers.clipping import GradientClip
from lightning_influence.records import Agree, MicroBatch, StepRecord

STATE_ESTIMATORS = ("acc", "first-order")

__all__ = [
    "InfluenceEngine",
    "MemoryPlan",
    "MicroBatch",
    "NonFiniteInfluenceError",
    "chunk_rows_for_budget",
    "plan_memory",
]


class InfluenceEngine(Estimator):
    """Holds the stacked states (``states[block]: Tensor[k, p]``) and advances them one step at a time.

    Args:
        loss: the functional batch / per-sample loss.
        jacobian: the optimizer model (decides the state blocks).
        num_tracked: k, the number of tracked samples (rows).
        estimator: ``"acc"`` | ``"first-order"``.
        chunk_size: rows per vectorised HVP call (bounds the HVP's working memory).
        dtype, device: of the states; the parameters' own dtype is the natural choice.
        tune_hvp: on the first step, time the HVP's methods (:func:`~lightning_influence.autodiff.hvp_plan.choose_hvp`,
            within ``chunk_size`` rows per call) and keep the cheaper step (``hvp_choice``); False: vmap over
            ``chunk_size`` rows.
        hvp_choice: the method chosen already (by :mod:`~lightning_influence.core.memory`); overrides ``tune_hvp``.
        agree: under data parallelism, gives every process rank zero's choice of the first step's timing (the
            chunks decide the all-reduces, which must match on every process); None for one process.
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
        tune_hvp: bool = False,
        hvp_choice: HvpChoice | None = None,
        agree: Agree | None = None,
    ) -> None:
        if estimator not in STATE_ESTIMATORS:
            raise ValueError(f"estimator must be one of {STATE_ESTIMATORS}, got {estimator!r}.")
        self.name = estimator
        self.loss = loss
        self.jacobian = jacobian
        self.chunk_size = max(1, int(chunk_size))
        self.num_tracked = num_tracked
        p = loss.layout.numel
        # the blocks are views of one buffer, so that the per-step NaN/inf check is one reduction
        self._storage = torch.zeros(len(jacobian.blocks), num_tracked, p, dtype=dtype, device=device)
        self.states = dict(zip(jacobian.blocks, self._storage.unbind(0)))
        stats = loss.running_stats  # running buffers (BatchNorm in train mode) are part of the state
        self.buffer_states = (
            None if stats is None else torch.zeros(num_tracked, stats.numel, dtype=dtype, device=device)
        )
        self._dtype, self._device = dtype, device
        # a forward that draws is differentiated by plain autograd, row by row (FunctionalLoss.linearize)
        fixed = HvpChoice("loop" if loss.coupled else "vmap", self.chunk_size)
        self.hvp_choice = hvp_choice or (None if tune_hvp and not loss.coupled else fixed)
        self._agree = agree

    @property
    def theta(self) -> torch.Tensor:
        """δθ for every tracked sample: ``Tensor[k, p]``."""
        return self.states["theta"]

    def _advance_buffers(self, theta_t: torch.Tensor, batches: list, frozen: dict | None) -> None:
        """δb ← d ⊙ δb + J_u δθ for the running buffers, from the pre-step δθ
        (:mod:`~lightning_influence.autodiff.running_stats`); nothing when the model moves none."""
        if self.buffer_states is None:
            return
        stats = self.loss.step_statistics(theta_t, batches, frozen)
        assert stats is not None  # the loss has running statistics
        for start in range(0, self.num_tracked, self.chunk_size):
            stop = min(start + self.chunk_size, self.num_tracked)
            stats.advance(self.buffer_states[start:stop], _as(self.theta[start:stop], theta_t.dtype))

    def book(self, record: StepRecord, parts: Sequence[MicroBatch], reduce: Reduce | None = None) -> torch.Tensor:
        return self.step(parts, record.optimizer, record.frozen, record.clip, reduce)

    def step(
        self,
        parts: Sequence[MicroBatch],
        opt_step: OptimizerStep,
        frozen: dict[str, torch.Tensor] | None = None,
        clip: GradientClip | None = None,
        reduce: Reduce | None = None,
    ) -> torch.Tensor:
        """Advance the states over one real optimizer step.

        Args:
            parts: the tracked rows of the step's micro-batches held by this process.
            opt_step: the factual step (θ_t, the gradient the optimizer consumed, hyper-parameters,
                post-step moments).
            frozen: values of the model's untracked parameters at θ_t.
            clip: the step's gradient clipping, bound to the unclipped gradient (None: no clipping).
            reduce: sums a tensor over data-parallel processes (None: a single process). Every
                process must call ``step`` with identical states; they stay identical.

        Returns:
            the (unclipped, reduced) gradient of the step loss at θ_t as the tracker computes it
            (``Tensor[p]``), for the self-check.
        """
        reduce = reduce or (lambda t: t)
        theta_t = opt_step.theta
        batches, weights = [p.batch for p in parts], [p.weight for p in parts]
        if self.hvp_choice is None:  # measured once, at the first step's parameters and batch

            def build(method: HvpMethod) -> StepHvp:
                return self.loss.linearize(theta_t, batches, frozen, weights, method)[1]

            choice = choose_hvp(build, self.theta.to(theta_t.dtype), self.chunk_size)
            self.hvp_choice = choice if self._agree is None else self._agree(choice)
        grad_t, hvp, losses = self.loss.linearize(theta_t, batches, frozen, weights, self.hvp_choice.method)
        for part, part_losses in zip(parts, losses):
            self.loss.check_batch_size(part.batch_size, part_losses.shape[0])
        source_rows, source = self._sources(parts, theta_t, frozen)
        self._advance_buffers(theta_t, batches, frozen)  # before δθ moves: the buffers read the pre-step δθ
        exact = self.name == "acc"
        whole = self.hvp_choice.rows >= self.num_tracked  # one call: no slicing (at small k, every op counts)
        for start in range(0, self.num_tracked, self.hvp_choice.rows):
            stop = min(start + self.hvp_choice.rows, self.num_tracked)
            chunk = self.states if whole else {b: s[start:stop] for b, s in self.states.items()}
            delta_g = hvp(_as(chunk["theta"], theta_t.dtype))
            delta_g = _as(delta_g, self._dtype)
            if source is not None:  # most steps at small k hold no tracked sample
                self._subtract_sources(delta_g, source_rows, source, start, stop)
            delta_g = reduce(delta_g)
            if clip is not None:
                delta_g = clip.perturb(delta_g, exact=exact)
            self.jacobian.advance(chunk, delta_g, opt_step, exact=exact)
        return reduce(grad_t)

    def _subtract_sources(
        self, delta_g: torch.Tensor, state_rows: list[int], source: torch.Tensor, start: int, stop: int
    ) -> None:
        """``delta_g[r - start] -= source[i]`` for the source rows ``r = state_rows[i]`` inside the chunk (plain
        Python over the m rows: a few tensor ops per chunk would cost more than the subtraction itself)."""
        picked = [i for i, r in enumerate(state_rows) if start <= r < stop]
        if picked:
            rows = torch.tensor([state_rows[i] - start for i in picked], device=self._device)
            chosen = source if len(picked) == len(state_rows) else source[picked]
            delta_g.index_add_(0, rows, chosen, alpha=-1)

    def _sources(
        self, parts: Sequence[MicroBatch], theta_t: torch.Tensor, frozen: dict | None
    ) -> tuple[list[int], torch.Tensor | None]:
        """The source terms (w_m/|B_m|)(g_j + c·H_j δθ_j) of the tracked samples present in the step, from their
        pre-step δθ: ``(their m state rows, Tensor[m, p])`` over all micro-batches; ``([], None)`` without any."""
        rows: list[int] = []
        sources = []
        for part in parts:
            if not part.state_rows.numel():
                continue
            b_rows = _on(part.batch_rows, theta_t.device)
            if self.name == "acc":
                own = _as(self.theta[_on(part.state_rows, self._device)], theta_t.dtype)
                g_j, h_j = self.loss.sample_gradients_and_hvps(
                    theta_t, part.batch, b_rows, part.batch_size, own, frozen
                )
                source = g_j.add_(h_j)  # fresh tensors: in place saves a [m, p] allocation per term
            else:
                source = self.loss.sample_gradients(theta_t, part.batch, b_rows, part.batch_size, frozen)
            rows.extend(part.state_rows.tolist())
            sources.append(_as(source.mul_(part.weight / part.batch_size), self._dtype))
        if len(sources) > 1:
            return rows, torch.cat(sources)
        return rows, sources[0] if sources else None

    def answer(self, probe: QueryProbe, per_example: bool = False) -> torch.Tensor:
        """⟨∇q, δθ_j⟩ (+ ⟨∇_b q, δb_j⟩ for the running buffers) for every tracked sample (``Tensor[k]``, or
        ``Tensor[k, n]`` per query example)."""
        scores = self.project(probe.example_gradients() if per_example else probe.gradient())
        if self.buffer_states is None:
            return scores
        g_b = probe.running_stats_gradient(per_example)
        assert g_b is not None  # the loss has running statistics
        g_b = g_b.to(self.buffer_states)
        return scores + self.buffer_states @ (g_b.T if per_example else g_b)

    def own_scores(self, probe: QueryProbe, rows: slice) -> torch.Tensor:
        """``Tensor[c]``: state row ``rows.start + i`` scored on the i-th example of ``probe``'s batch (a sample's
        influence on its own loss when the batch holds the rows' samples)."""
        deltas = self.theta[rows]
        scores = (deltas * probe.example_gradients().to(deltas)).sum(dim=1)
        if self.buffer_states is None:
            return scores
        g_b = probe.running_stats_gradient(per_example=True)
        assert g_b is not None  # the loss has running statistics
        return scores + (self.buffer_states[rows] * g_b.to(deltas)).sum(dim=1)

    def project(self, gradient: torch.Tensor) -> torch.Tensor:
        """Scores ``⟨∇q, δθ_j⟩`` for every tracked sample: ``Tensor[k]`` (or ``Tensor[k, n]`` for
        query gradients ``Tensor[n, p]``); the sign of [concepts.md: The counterfactual run] (negative = harmful)."""
        q = gradient.to(self.theta.device, self.theta.dtype)
        return self.theta @ q if q.dim() == 1 else self.theta @ q.T

    def check_finite(self, step: int, sample_ids: torch.Tensor) -> None:
        """Raise :class:`NonFiniteInfluenceError` naming the step and the first bad samples."""
        buffers = 0.0 if self.buffer_states is None else self.buffer_states.sum().item()
        if math.isfinite(self._storage.sum().item() + buffers):  # one reduction per tensor, in the common case
            return
        blocks = dict(self.states, **({} if self.buffer_states is None else {"running buffers": self.buffer_states}))
        for block, state in blocks.items():
            bad = ~torch.isfinite(state).all(dim=1)
            if bad.any():
                ids = sample_ids[bad.nonzero().flatten().cpu()].tolist()
                raise NonFiniteInfluenceError(
                    f"NaN/inf appeared in the influence state {block!r} at optimizer step {step} for sample ids"
                    f" {ids[:10]}. Training itself is likely diverging (check the loss), or the learning rate is too"
                    " large for the linearisation; lower it or track in float64 (precision='64-true')."
                )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"states": {b: s.detach().cpu().clone() for b, s in self.states.items()}}
        if self.buffer_states is not None:
            state["buffer_states"] = self.buffer_states.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["states"]
        if {b: tuple(t.shape) for b, t in saved.items()} != {b: tuple(t.shape) for b, t in self.states.items()}:
            raise ValueError("The saved influence states have other blocks or shapes than this engine's.")
        if self.buffer_states is not None:
            buffers = state.get("buffer_states")
            if buffers is None or tuple(buffers.shape) != tuple(self.buffer_states.shape):
                raise ValueError("The saved influence states hold no running-buffer states of this engine's shape.")
            self.buffer_states.copy_(buffers)
        for b, s in saved.items():
            self.states[b].copy_(s)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a dispatch when it already is (at small k, every op of the step counts)."""
    return t if t.dtype == dtype else t.to(dtype)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, without a dispatch when it already is."""
    return t if t.device == device else t.to(device)


@dataclass(frozen=True)
class MemoryPlan:
    """Memory and work of the forward states.

    A step holds the states (``k × p × blocks`` numbers) and, at its peak, either one HVP chunk (``row_bytes`` per
    row, plus ``fixed_bytes``: the step's gradient graph and the tracked samples' source rows) or, before the
    chunks, the tracked samples' per-sample gradients and HVPs (``source_bytes``). Without a measurement
    (``measured=False``) a row counts as 6 × p numbers and the rest as nothing.
    """

    num_tracked: int
    num_params: int
    blocks: tuple[str, ...]
    itemsize: int
    chunk_rows: int
    row_bytes: int = 0
    fixed_bytes: int = 0
    source_bytes: int = 0
    measured: bool = False
    probe_bytes: int = 0  # the HVP method's timing at train start, before the states exist (its widest call)

    @property
    def state_bytes(self) -> int:
        return self.num_tracked * self.num_params * len(self.blocks) * self.itemsize

    @property
    def work_bytes(self) -> int:
        """The step's peak beside the states: one HVP chunk with what it keeps, or the per-sample phase."""
        if not self.blocks:
            return 0
        row = self.row_bytes or 6 * self.num_params * self.itemsize
        return max(min(self.num_tracked, self.chunk_rows) * row + self.fixed_bytes, self.source_bytes)

    @property
    def total_bytes(self) -> int:
        """What the tracker adds to training's peak: states + workspace, or the train-start probe if larger."""
        return max(self.state_bytes + self.work_bytes, self.probe_bytes)

    @property
    def checkpoint_bytes(self) -> int:
        """What a checkpoint adds while it is saved, beside the states: their copy in the state dict and its
        serialised bytes (Lightning writes a checkpoint from an in-memory buffer); the workspace is free then."""
        return 2 * self.state_bytes

    @property
    def hvp_calls(self) -> int:
        return math.ceil(self.num_tracked / self.chunk_rows) if self.blocks else 0


def chunk_rows_for_budget(num_params: int, itemsize: int, budget_bytes: int, k: int) -> int:
    """Rows per HVP chunk so that the chunk's vectors and their intermediates (≈ 6 × p per row)
    fit in ``budget_bytes``."""
    return max(1, min(k, budget_bytes // max(1, 6 * num_params * itemsize)))


def plan_memory(
    num_tracked: int,
    num_params: int,
    blocks: Sequence[str],
    dtype: torch.dtype,
    budget_bytes: int,
    chunk_rows: int | None,
    measured: tuple[int, int, int] | None = None,
) -> MemoryPlan:
    """The states' and the workspace's size (``blocks=()`` for an estimator without states).

    ``measured``: ``(row_bytes, fixed_bytes, source_bytes)`` of :class:`MemoryPlan`, measured on a training batch
    (activations included); without it a row is 6 × p numbers. The chunk is ``chunk_rows``, else as many rows
    as fit in ``budget_bytes``."""
    itemsize = torch.finfo(dtype).bits // 8
    row, fixed, source = measured or (0, 0, 0)
    if chunk_rows is None and row:
        chunk_rows = max(1, min(num_tracked, budget_bytes // row))
    elif chunk_rows is None:
        chunk_rows = chunk_rows_for_budget(num_params, itemsize, budget_bytes, num_tracked)
    return MemoryPlan(
        num_tracked, num_params, tuple(blocks), itemsize, max(1, int(chunk_rows)), row, fixed, source,
        measured=measured is not None,
    )  # fmt: skip
