"""Plain records of one optimizer step, and the interface every optimizer model implements.

A model knows three maps of one real step of its optimizer ([concepts.md: One step]):

- ``apply``: the factual step, θ_t and the pre-step optimizer state → θ_{t+1} and the post-step state,
  computed as PyTorch computes it (replay, self-check);
- ``advance``: the forward map of stacked per-sample perturbations of the state
  (``exact=False``: its Jacobian, estimator ``"first-order"``);
- ``transpose``: the transpose of the linear forward map, for the adjoint sweep ([concepts.md: Every sample at once]).

Nothing here knows Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch


@dataclass
class GroupStep:
    """Hyper-parameters of one param group at one optimizer step, read as the optimizer used them.

    ``region`` is the group's slice of the flat tracked-parameter vector (empty when the group has no
    tracked parameter). For Adam(W), ``step`` is the step count *after* the update (c₀ in [concepts.md: One step];
    1 means the optimizer state was just created). For SGD with momentum, ``first_momentum_step``
    says that the momentum buffer did not exist before this step. Every other optimizer keeps a step count
    too (``step``, the same convention). The later fields are the other optimizers' hyper-parameters:
    RMSprop's ``alpha`` and ``centered`` (it shares ``momentum``), Adagrad's ``lr_decay`` and
    ``initial_accumulator_value``, Adam(W)'s ``amsgrad``, NAdam's ``momentum_decay`` and ``mu_product`` (the
    product μ_1⋯μ_c₀ *after* this step, as torch stores it), and NAdam / RAdam's ``decoupled_weight_decay``.
    """

    region: slice
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    first_momentum_step: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    step: int = 1
    alpha: float = 0.99
    centered: bool = False
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    amsgrad: bool = False
    momentum_decay: float = 0.004
    mu_product: float = 1.0
    decoupled_weight_decay: bool = False


@dataclass(frozen=True)
class OptimizerStep:
    """One real optimizer step: per-group hyper-parameters and the factual flat tensors (``Tensor[p]``).

    ``theta`` are the pre-step parameters, ``grad`` the gradient the optimizer received (after any
    clipping), ``exp_avg`` / ``exp_avg_sq`` Adam's moments *after* the step (None for SGD), ``post_state`` every
    flat post-step state tensor the model names in :attr:`OptimizerJacobian.post_state_keys`.
    """

    groups: list[GroupStep]
    theta: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    post_state: Mapping[str, torch.Tensor | None] = field(default_factory=dict)

    def with_post_state(self, state: Mapping[str, torch.Tensor | None]) -> OptimizerStep:
        """The same step with the optimizer's flat post-step state (``{key: Tensor[p]}``), once it has stepped."""
        return replace(self, exp_avg=state.get("exp_avg"), exp_avg_sq=state.get("exp_avg_sq"), post_state=dict(state))

    def lr_vector(self) -> torch.Tensor:
        """``Tensor[p]``: the learning rate that applies to each coordinate."""
        lr = torch.empty_like(self.theta)
        for g in self.groups:
            lr[g.region] = g.lr
        return lr


FlatState = dict[str, "torch.Tensor | None"]  # {state key (see state.STATE_KEYS): Tensor[p] or None}


class OptimizerJacobian:
    """Base class: ``blocks`` names the per-sample state blocks; ``apply`` / ``advance`` / ``transpose``
    are the factual step, the perturbation's forward map and the transpose of its linear part."""

    blocks: tuple[str, ...] = ("theta",)
    post_state_keys: tuple[str, ...] = ()
    """The optimizer state (keys of ``optimizer.state[p]``) that the maps read *after* the step, from
    :attr:`OptimizerStep.post_state`."""

    def advance(self, states: dict[str, torch.Tensor], delta_g: torch.Tensor, step: OptimizerStep, exact: bool) -> None:
        """Advance every block of ``states`` (each ``Tensor[c, p]``, modified in place) by one step.

        ``delta_g`` (``Tensor[c, p]``, may be overwritten) is the perturbation of the gradient the
        optimizer received, at the pre-step parameters; ``states["theta"]`` holds δθ at the pre-step
        parameters on entry. ``exact=False`` is the linear map O(s, δg) that ``transpose`` transposes.
        """
        raise NotImplementedError

    def transpose(self, adjoint: dict[str, torch.Tensor], step: OptimizerStep) -> torch.Tensor:
        """Transpose of the linear ``advance`` (``exact=False``) of this step.

        ``adjoint`` holds λ_{t+1}, one ``Tensor[c, p]`` per name of ``blocks`` (the adjoint of the
        post-step perturbation). On return its blocks are overwritten in place with the adjoint of the
        pre-step blocks through the optimizer alone (δθ→δθ', δm→δm', δv→δv', δbuf→δbuf' and the weight
        decay paths; *not* the H·u path through the gradient, which the caller adds). Returns
        u (``Tensor[c, p]``), the adjoint of δg, such that for every s and δg

            ⟨λ', O(s, δg)⟩ = ⟨transposed blocks, s⟩ + ⟨u, δg⟩.
        """
        raise NotImplementedError

    def apply(self, step: OptimizerStep, pre_state: FlatState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The factual step as PyTorch computes it.

        Args:
            step: pre-step parameters ``theta``, the received gradient ``grad`` (``Tensor[p]``) and
                the groups' hyper-parameters (its ``exp_avg`` / ``exp_avg_sq`` are not read).
            pre_state: the flat pre-step optimizer state; a missing key or None means "no state yet".

        Returns:
            ``(θ_{t+1}: Tensor[p], post-step flat state)``: ``{"momentum_buffer"}`` for SGD with
            momentum, ``{"exp_avg", "exp_avg_sq"}`` for Adam(W), ``{}`` when the model keeps no state.
        """
        raise NotImplementedError

    def predict(self, step: OptimizerStep, pre_state: FlatState) -> torch.Tensor:
        """The factual post-step parameters ``Tensor[p]`` (the θ part of :meth:`apply`)."""
        return self.apply(step, pre_state)[0]


def columns(t: torch.Tensor, region: slice) -> torch.Tensor:
    """``t[..., region]`` (``t``: ``Tensor[p]`` or ``Tensor[c, p]``), or ``t`` itself when the region is all of it:
    at small k the per-step maps cost what their torch calls cost, and one group usually covers every parameter."""
    if region.start == 0 and region.stop == t.shape[-1]:
        return t
    return t[..., region]


def is_empty(region: slice) -> bool:
    """True for the region of a group with nothing tracked."""
    return region.start == region.stop


def fresh(g: GroupStep) -> bool:
    """True when the optimizer state was created by this step (step count 1): the counterfactual state restarts
    too, so the perturbations of the pre-step state are 0 (a continued fit with a fresh optimizer)."""
    return g.step == 1


def zero_if_fresh(g: GroupStep, *blocks: torch.Tensor) -> None:
    """Zero the perturbations of the pre-step state (``Tensor[c, r]`` each, in place) when :func:`fresh`."""
    if fresh(g):
        for b in blocks:
            b.zero_()


def sqrt_slope(root: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``Tensor[r]``: d√(x/scale)/dx = 1/(2·scale·√(x/scale)) given ``root`` = √(x/scale); 0 where the root is 0
    (the one-sided derivative there is infinite: the models take the branch that keeps the map finite)."""
    safe = root.clamp(min=torch.finfo(root.dtype).tiny)
    return torch.where(root > 0, 1 / (2 * scale * safe), 0.0)


def consumed_gradient(step: OptimizerStep, g: GroupStep, coupled: bool = True) -> torch.Tensor:
    """ĝ over the group's region (``Tensor[r]``): the received gradient plus the coupled L2 term λθ, computed as
    torch does (``grad.add(param, alpha=λ)``); the gradient itself when there is no coupled weight decay."""
    grad = columns(step.grad, g.region)
    if g.weight_decay and coupled:
        return grad.add(columns(step.theta, g.region), alpha=g.weight_decay)
    return grad


class PreviousStep:
    """Remembers the last step a model advanced, so that its post-step state stands in for the pre-step state of
    the next one (the optimizers that keep a running maximum need the pre-step maximum for their exact map).

    The previous step is the next one's predecessor when each group's step count went up by exactly one; after a
    resume or at the first step seen it is unknown (:meth:`pre_state` returns None)."""

    def __init__(self) -> None:
        self._current: OptimizerStep | None = None
        self._previous: OptimizerStep | None = None

    def see(self, step: OptimizerStep) -> None:
        """Call at every ``advance`` (chunks of the same step are seen once)."""
        if step is not self._current:
            self._previous, self._current = self._current, step

    def pre_state(self, step: OptimizerStep, g: GroupStep, key: str) -> torch.Tensor | None:
        """``Tensor[r]``: the state ``key`` before ``step`` over group ``g``'s region, when known."""
        prev = self._previous if step is self._current else self._current
        if prev is None:
            return None
        before = next((h for h in prev.groups if h.region == g.region), None)
        value = prev.post_state.get(key)
        if before is None or value is None or before.step != g.step - 1:
            return None
        return columns(value, g.region)
