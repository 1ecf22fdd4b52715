"""Every sample at once: the adjoint of the ``"first-order"`` recursion over a recorded trajectory ([concepts.md: Every
sample at once]).

For each tracked sample j the forward recursion is linear, s_{t+1} = A_t s_t + b_t^{(j)}, with

    δg = H_t δθ − Σ_{m ∋ j} (w_m/|B_m|) g_j(θ_t),    then the clip Jacobian C_t, then the optimizer's linear map

(H_t the Hessian of the step loss L_t = Σ_m w_m (mean_{i∈B_m} ℓ_i + R)). The score of j for a query
vector q put at boundary s is Σ_{t<s} ⟨λ_{t+1}, b_t^{(j)}⟩ with λ_s = (q, 0, …) and λ_t = A_tᵀ λ_{t+1}.
Going backward over step t with λ_{t+1} (one row per query vector and boundary):

    u_t  = C_tᵀ Oᵀ_g λ_{t+1}                              (the optimizer's transpose, then the clip's)
    λ_t  = Oᵀ_s λ_{t+1} + (H_t u_t in the θ block)
    score[i] += −(w_m/|B_m|) ⟨u_t, ∇ℓ_i(θ_t)⟩               for every sample i of every micro-batch m

H_t u_t and every ⟨u_t, ∇ℓ_i(θ_t)⟩ come from one forward-over-reverse pass (a JVP of the gradient, whose
forward pass carries the per-sample losses along), vectorised over the rows
(:meth:`FunctionalLoss.hvp_and_directional`): per-sample gradients are never formed, no gradient graph is
kept, and the memory is the adjoint (rows × p per block) plus the score table (rows × samples).

:class:`AdjointSweep` is incremental, for a replay that rebuilds the steps segment by segment in
reverse order: ``seed`` rows at the current boundary, ``step_back`` over each step. Rows seeded at
boundary s with ∇q(θ_s) end with I_j(s) = ⟨∇q(θ_s), δθ_j(s)⟩, the forward ``"first-order"`` value; a
window [a, b] is I(b) − I(a).

A model whose training forward moves running buffers (BatchNorm in train mode) has them in its state
(:mod:`~lightning_influence.autodiff.running_stats`): r_{t+1} = d ⊙ r_t + u_t(θ_t). Their adjoint λ_b is seeded with
the query's gradient in the buffers, and going back over step t

    λθ_t += J_uᵀ λb_{t+1}        λb_t = d ⊙ λb_{t+1}

(the buffers carry no source term: the sample's weight does not enter the batch statistics). Nothing here knows
Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from lightning_influence.autodiff.functional import FunctionalLoss
from lightning_influence.optimizers import OptimizerJacobian, OptimizerStep
from lightning_influence.optimizers.clipping import GradientClip


@dataclass
class AdjointStep:
    """What the sweep needs of one optimizer step t.

    ``opt_step``: pre-step θ_t, the gradient the optimizer consumed (after clipping), the groups'
    hyper-parameters and, for Adam(W), the post-step moments. ``micro_batches``: ``(collated batch,
    sample_ids: LongTensor[B_m], weight w_m)``, the step loss being Σ_m w_m (mean_i ℓ_i + R); a batch's
    ids are the columns of the score table and must be distinct within the batch. ``clip``: the step's
    gradient clipping bound to the unclipped gradient (None: none). ``frozen``: untracked trainable
    parameters' values at θ_t (constants of the loss).
    """

    opt_step: OptimizerStep
    micro_batches: list[tuple[Any, torch.Tensor, float]]
    clip: GradientClip | None = None
    frozen: dict[str, torch.Tensor] | None = None


class AdjointSweep:
    """Adjoints ``adjoint[block]: Tensor[num_rows, p]`` swept backward in time, and the scores they collect.

    Args:
        loss: the functional loss (its ``layout`` gives p).
        jacobian: the optimizer model (decides the blocks; its ``transpose`` is used).
        num_samples: columns of the score table (sample ids are column indices).
        num_rows: adjoint rows (query vectors × boundaries).
        dtype, device: of the adjoints and the scores.
        chunk_size: rows per vectorised HVP / JVP call (None: all active rows at once); bounds the
            working memory of the model's forward and backward passes.
        reduce: on one of several processes sharing the replay (:mod:`~lightning_influence.trajectory.shards`), the
            sum over the processes of a tensor: each holds a part of each step's micro-batches, and H u is the sum of
            the parts (None: one process). The score table then holds this process's samples' terms only.

    ``scores: Tensor[num_rows, num_samples]`` accumulates Σ_t ⟨λ_{t+1}, b_t^{(j)}⟩: the predicted
    ⟨∇q, δθ_j⟩ with the sign of [concepts.md: The counterfactual run] (negative = harmful).
    """

    def __init__(
        self,
        loss: FunctionalLoss,
        jacobian: OptimizerJacobian,
        num_samples: int,
        num_rows: int,
        dtype: torch.dtype,
        device: torch.device,
        chunk_size: int | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.loss = loss
        self.reduce = reduce
        self.jacobian = jacobian
        self.chunk_size = chunk_size
        p = loss.layout.numel
        self.adjoint = {b: torch.zeros(num_rows, p, dtype=dtype, device=device) for b in jacobian.blocks}
        self.scores = torch.zeros(num_rows, num_samples, dtype=dtype, device=device)
        stats = loss.running_stats  # λ_b: the running buffers' adjoint, when the forward moves any
        self.buffer_adjoint = None if stats is None else torch.zeros(num_rows, stats.numel, dtype=dtype, device=device)
        # rows never seeded stay exactly 0 (the maps are linear): they cost nothing
        self._active = torch.zeros(num_rows, dtype=torch.bool, device=device)

    def seed(self, rows: torch.Tensor, vectors: torch.Tensor, buffer_vectors: torch.Tensor | None = None) -> None:
        """Start rows at the current time (a boundary s): λθ[rows] += vectors (``Tensor[r, p]``, e.g. ∇q(θ_s)), and
        λb[rows] += buffer_vectors (``Tensor[r, q]``, the query's gradient in the running buffers) if any."""
        rows = rows.to(self.scores.device)
        self.adjoint["theta"].index_add_(0, rows, vectors.to(self.scores))
        if self.buffer_adjoint is not None and buffer_vectors is not None:
            self.buffer_adjoint.index_add_(0, rows, buffer_vectors.to(self.scores))
        self._active[rows] = True

    def step_back(self, step: AdjointStep) -> None:
        """Move the adjoints from time t+1 to t over step t, adding the step's terms to the scores."""
        active = self._active.nonzero().flatten()
        if not active.numel():
            return
        size = self.chunk_size or active.numel()
        for start in range(0, active.numel(), size):
            rows = active[start : start + size]
            blocks = {b: a.index_select(0, rows) for b, a in self.adjoint.items()}
            self._back(rows, blocks, step)
            for b, a in self.adjoint.items():
                a.index_copy_(0, rows, blocks[b])
        self._back_buffers(active, step)  # after the chunks: their transposes read λθ_{t+1}

    def _back(self, rows: torch.Tensor, blocks: dict[str, torch.Tensor], step: AdjointStep) -> None:
        """λ_{t+1} → λ_t in place on ``blocks`` (each ``Tensor[c, p]``), and the step's score terms of ``rows``."""
        theta = step.opt_step.theta
        u = self.jacobian.transpose(blocks, step.opt_step)
        if step.clip is not None:
            u = step.clip.transpose(u)
        u = u.to(theta.dtype)
        batches = [batch for batch, _, _ in step.micro_batches]
        weights = [float(w) for _, _, w in step.micro_batches]
        # one forward-over-reverse pass per row gives H u (H symmetric: Hᵀu = Hu) and every ⟨u, ∇ℓ_i⟩
        if batches:
            hu, dots = self.loss.hvp_and_directional(theta, batches, u, step.frozen, weights)
        else:  # a process of a shared replay that holds none of this step's samples
            hu, dots = torch.zeros_like(u), ()
        if self.reduce is not None:
            hu = self.reduce(hu)
        blocks["theta"] += hu.to(blocks["theta"].dtype)
        for (_, ids, weight), batch_dots in zip(step.micro_batches, dots):
            self._collect(rows, ids, weight, batch_dots)

    def _back_buffers(self, rows: torch.Tensor, step: AdjointStep) -> None:
        """λθ_t += J_uᵀ λb_{t+1}, then λb_t = d ⊙ λb_{t+1}, for ``rows`` (all at once: λb is q ≪ p wide; the step's
        buffer map is built once); nothing without running buffers."""
        if self.buffer_adjoint is None:
            return
        batches = [batch for batch, _, _ in step.micro_batches]
        stats = self.loss.step_statistics(step.opt_step.theta, batches, step.frozen)
        assert stats is not None  # the loss has running statistics
        adjoint = self.buffer_adjoint.index_select(0, rows)
        theta = self.adjoint["theta"]
        theta.index_add_(0, rows, stats.vjp(adjoint).to(theta.dtype))
        self.buffer_adjoint.index_copy_(0, rows, adjoint * stats.decay.to(adjoint))

    def _collect(self, rows: torch.Tensor, ids: torch.Tensor, weight: float, dots: torch.Tensor) -> None:
        """scores[rows, ids] += −(w/|B|) ⟨u_r, ∇ℓ_i(θ)⟩ for every row r and batch sample i (``dots: Tensor[c, B]``)."""
        self.loss.check_batch_size(ids.numel(), dots.shape[1])
        dots = dots.to(self.scores.dtype) * (-float(weight) / ids.numel())
        ids = ids.to(self.scores.device)
        self.scores.index_put_((rows[:, None], ids[None, :]), dots, accumulate=True)
