"""In-run self-influence of every training sample of a recorded run ([concepts.md: Self-influence of every sample]).

For a forward-tracked sample, the self-influence is the counterfactual ℓ_j(θ_-j(T)) − ℓ_j(θ(T)). Over every sample of
a recorded run, where one counterfactual per sample is out of reach, it is the optimizer-aware *in-run*
self-influence

    s_j = Σ_t Σ_{m∋j} (η_t w_m/|B_m|) ⟨∇ℓ_j(θ_t), P_t C_t ∇ℓ_j(θ_t)⟩

summed over the steps t whose micro-batches m hold j (w_m the micro-batch's weight, 1/N under gradient accumulation
of N micro-batches; |B_m| its size). P_t is the diagonal preconditioner of the optimizer at step t, read from the
replayed post-step state (the state that step's update divides by): η_t P_t is :func:`step_rates`. C_t is the linear
map of the step's gradient clipping at the step's gradient (the identity without clipping; a clipped step moves
less). Each term is what the step's own update, with P_t held fixed, lowered ℓ_j by because j was in the batch:
removing j from step t alone raises ℓ_j(θ_{t+1}) by (η_t w_m/|B_m|) ⟨∇ℓ_j, P_t C_t ∇ℓ_j⟩ to first order. The sign is
that of every score: positive = the sample helps its own loss (almost always, as ⟨g, P g⟩ ≥ 0 for P ≥ 0 and no
clip); an unusually large s_j is the classic sign of a sample the model bends to fit alone (a mislabel).

The preconditioner of each optimizer model (P_t over a parameter group with learning rate η_t):

| model | P_t |
|---|---|
| SGD (momentum, nesterov, dampening) | 1, the identity (momentum carries g_j into later steps: not counted) |
| Adam, AdamW, NAdam | 1 / (√v̂_t + ε), v̂_t = v_t / (1 − β2^c), v_t the post-step ``exp_avg_sq`` |
| Adam(W) with ``amsgrad=True`` | 1 / (√(v̄_t / (1 − β2^c)) + ε), v̄_t the post-step ``max_exp_avg_sq`` |
| RAdam | r √(1 − β2^c) / (√v_t + ε) on the rectified branch (ρ > 5), 1 on the other |
| RMSprop | 1 / (√s_t + ε), s_t = ``square_avg`` (centered: ``square_avg − grad_avg²``) |
| Adagrad | (1 / (1 + (c − 1) κ)) / (√S_t + ε), S_t the post-step ``sum``, κ = ``lr_decay`` |
| Adamax | 1 / u_t, u_t the post-step ``exp_inf`` |

(c the step count after the update). As for SGD's momentum, the first-moment factors of the numerators (m̂'s bias
correction, NAdam's μ) are not part of P_t: the preconditioner is the factor that turns a gradient into a step.

Per-sample gradients come from the step's loss (:meth:`FunctionalLoss.sample_gradients`): a model that draws or
couples the rows of a batch gets them from the batch's own forward. Nothing here knows Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Callable

import torch

from lightning_influence.autodiff.functional import FunctionalLoss
from lightning_influence.optimizers import (
    AdagradJacobian,
    AdamaxJacobian,
    AdamJacobian,
    AMSGradJacobian,
    GroupStep,
    NAdamJacobian,
    OptimizerJacobian,
    OptimizerStep,
    RAdamJacobian,
    RMSpropJacobian,
    SGDJacobian,
)
from lightning_influence.optimizers.adagrad import decayed_lr
from lightning_influence.optimizers.clipping import GradientClip
from lightning_influence.optimizers.radam import rectification
from lightning_influence.trajectory.adjoint import AdjointStep

__all__ = ["SelfInfluence", "step_rates"]

Rate = Callable[[OptimizerJacobian, OptimizerStep, GroupStep], "torch.Tensor | float"]


def _post(step: OptimizerStep, key: str, g: GroupStep) -> torch.Tensor:
    """``Tensor[r]``: the post-step optimizer state ``key`` over the group's region."""
    value = step.post_state.get(key)
    if value is None:
        raise ValueError(f"The replayed optimizer step holds no post-step {key!r}: its preconditioner is unknown.")
    return value[g.region]


def _adam_rate(model: OptimizerJacobian, step: OptimizerStep, g: GroupStep) -> torch.Tensor:
    """η / (√v̂ + ε) (Adam, AdamW, NAdam; AMSGrad: v̄ in place of v), with Adam's operations."""
    key = "max_exp_avg_sq" if isinstance(model, AMSGradJacobian) and g.amsgrad else "exp_avg_sq"
    bc2 = 1 - g.beta2**g.step
    return g.lr / (_post(step, key, g).sqrt() / math.sqrt(bc2)).add_(g.eps)


def _radam_rate(model: OptimizerJacobian, step: OptimizerStep, g: GroupStep) -> torch.Tensor | float:
    """η r √bc2 / (√v + ε) on the rectified branch, η on the other."""
    rect = rectification(g)
    if rect is None:
        return g.lr
    return g.lr * rect * math.sqrt(1 - g.beta2**g.step) / _post(step, "exp_avg_sq", g).sqrt().add_(g.eps)


def _rmsprop_rate(model: OptimizerJacobian, step: OptimizerStep, g: GroupStep) -> torch.Tensor:
    """η / (√s + ε), s = v − a² for a centered group, else v."""
    v = _post(step, "square_avg", g)
    if getattr(model, "centered", False) and g.centered:
        a = _post(step, "grad_avg", g)
        return g.lr / v.addcmul(a, a, value=-1).sqrt_().add_(g.eps)
    return g.lr / v.sqrt().add_(g.eps)


_RATES: tuple[tuple[type[OptimizerJacobian], Rate], ...] = (
    (SGDJacobian, lambda model, step, g: g.lr),
    (AdamJacobian, _adam_rate),  # AdamW too
    (AMSGradJacobian, _adam_rate),
    (NAdamJacobian, _adam_rate),
    (RAdamJacobian, _radam_rate),
    (RMSpropJacobian, _rmsprop_rate),
    (AdagradJacobian, lambda model, step, g: decayed_lr(g) / _post(step, "sum", g).sqrt().add_(g.eps)),
    (AdamaxJacobian, lambda model, step, g: g.lr / _post(step, "exp_inf", g)),
)


def step_rates(model: OptimizerJacobian, step: OptimizerStep) -> torch.Tensor:
    """``Tensor[p]``: η_t P_t, the diagonal of the learning rate times the preconditioner of ``model``'s optimizer at
    ``step`` (whose ``post_state`` holds the post-step optimizer state); 0 outside every parameter group.

    Raises ``TypeError`` for a model without a known preconditioner."""
    rate = next((fn for cls, fn in _RATES if isinstance(model, cls)), None)
    if rate is None:
        raise TypeError(f"No in-run self-influence for the optimizer model {type(model).__name__}: its preconditioner"
                        " is unknown.")  # fmt: skip
    out = torch.zeros_like(step.theta)
    for g in step.groups:
        if g.region.start != g.region.stop:
            out[g.region] = rate(model, step, g)
    return out


class SelfInfluence:
    """Accumulates s_j over the steps of a run, for every sample id in [0, ``num_samples``).

    Args:
        loss: the steps' loss (per-sample gradients at θ_t; the training forward's autocast, when the run had one).
        model: the optimizer model of the run (:func:`step_rates`).
        num_samples: columns of :attr:`scores` (sample ids are column indices).
        dtype, device: of :attr:`scores`.
        chunk_size: batch rows per per-sample-gradient call (None: a whole micro-batch at once); the call holds
            ``chunk_size × p`` gradients.

    ``scores: Tensor[num_samples]``: Σ so far; a sample no step consumed keeps exactly 0. Positive = helpful to its
    own loss.
    """

    def __init__(
        self,
        loss: FunctionalLoss,
        model: OptimizerJacobian,
        num_samples: int,
        dtype: torch.dtype,
        device: torch.device,
        chunk_size: int | None = None,
    ) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}.")
        self.loss, self.model, self.chunk_size = loss, model, chunk_size
        self.scores = torch.zeros(num_samples, dtype=dtype, device=device)

    def add(self, step: AdjointStep) -> None:
        """Add step t's terms: (η_t w_m/|B_m|) ⟨g_j, P_t C_t g_j⟩ for every sample j of every micro-batch m."""
        rates = step_rates(self.model, step.opt_step)
        theta = step.opt_step.theta
        for batch, ids, weight in step.micro_batches:
            terms = self._quadratic_forms(theta, batch, ids.numel(), rates, step.clip, step.frozen)
            self.scores.index_add_(0, ids.to(self.scores.device), terms.to(self.scores) * (float(weight) / ids.numel()))

    def add_all(self, steps: Iterable[AdjointStep]) -> torch.Tensor:
        """:meth:`add` every step of ``steps``; returns :attr:`scores`."""
        for step in steps:
            self.add(step)
        return self.scores

    def _quadratic_forms(
        self,
        theta: torch.Tensor,
        batch: object,
        size: int,
        rates: torch.Tensor,
        clip: GradientClip | None,
        frozen: dict | None,
    ) -> torch.Tensor:
        """``Tensor[size]``: ⟨g_i, diag(rates) C g_i⟩ for every row i of the batch (g_i = ∇ℓ_i(θ))."""
        out = []
        chunk = self.chunk_size or size
        for start in range(0, size, chunk):
            rows = torch.arange(start, min(start + chunk, size), device=theta.device)
            with torch.enable_grad():
                grads = self.loss.sample_gradients(theta, batch, rows, size, frozen).detach()  # [c, p]
            moved = grads if clip is None else clip.perturb(grads.clone(), exact=False)
            out.append((grads * rates.to(grads) * moved.to(grads)).sum(dim=1))
        return torch.cat(out)
