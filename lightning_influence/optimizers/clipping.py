"""Gradient clipping inside the optimizer step: the clip's value and how it moves a perturbation.

Lightning clips the gradient the optimizer consumes (``gradient_clip_val``) after the backward
pass: by global 2-norm (``torch.nn.utils.clip_grad_norm_``: g · min(1, c / (‖g‖ + 1e-6))) or by
value (``clip_grad_value_``: clamp(g, −c, c)). A counterfactual run clips its own gradient
g + δg, so the optimizer sees the perturbation

    exact:   clip(g + δg) − clip(g)                     (estimator "acc")
    linear:  J_clip(g) δg                                (estimator "first-order")

and the adjoint sweep ([concepts.md: Every sample at once]) needs the transpose J_clip(g)ᵀ u of the linear map.
Each class is bound to the factual, unclipped gradient of one step. Nothing here knows Lightning.
"""

from __future__ import annotations

import torch

_NORM_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ adds it to the norm


class GradientClip:
    """Base class: ``clipped`` is what the optimizer consumed; ``perturb`` maps δg (``Tensor[c, p]``)."""

    def __init__(self, grad: torch.Tensor) -> None:
        self.grad = grad  # the unclipped gradient: Tensor[p]

    @property
    def clipped(self) -> torch.Tensor:
        raise NotImplementedError

    def perturb(self, delta_g: torch.Tensor, exact: bool) -> torch.Tensor:
        raise NotImplementedError

    def transpose(self, u: torch.Tensor) -> torch.Tensor:
        """``J_clip(g)ᵀ u`` for rows ``u: Tensor[c, p]`` (not modified): the adjoint of the unclipped
        gradient's perturbation, given the adjoint u of the clipped one."""
        raise NotImplementedError


class NormClip(GradientClip):
    """``clip_grad_norm_(max_norm)`` over all the optimizer's parameters.

    Args:
        grad: unclipped gradient of the tracked parameters, ``Tensor[p]``.
        max_norm: the clip threshold c.
        other_sq_norm: squared norm of the gradients of trainable parameters that are not tracked
            (they enter the global norm; their own perturbation is not modelled, like their values).
    """

    def __init__(self, grad: torch.Tensor, max_norm: float, other_sq_norm: float = 0.0) -> None:
        super().__init__(grad)
        self.max_norm = float(max_norm)
        self.other_sq_norm = float(other_sq_norm)
        self.norm = float(torch.sqrt(grad.double().pow(2).sum() + self.other_sq_norm))
        self.scale = min(1.0, self.max_norm / (self.norm + _NORM_EPS))

    @property
    def clipped(self) -> torch.Tensor:
        return self.grad * self.scale

    def perturb(self, delta_g: torch.Tensor, exact: bool) -> torch.Tensor:
        g = self.grad.to(delta_g.dtype)
        if exact:
            perturbed = delta_g + g  # [c, p]: each counterfactual's own gradient
            norms = (perturbed.pow(2).sum(dim=1, keepdim=True) + self.other_sq_norm).sqrt()
            scales = (self.max_norm / (norms + _NORM_EPS)).clamp(max=1.0)
            return perturbed.mul_(scales).sub_(g, alpha=self.scale)
        if self.scale >= 1.0:
            return delta_g  # not clipped: the clip is the identity around g
        # d/dg [g · c / (‖g‖ + ε)] δ = s δ − c (g·δ) g / ((‖g‖ + ε)² ‖g‖)
        coeff = self.max_norm / ((self.norm + _NORM_EPS) ** 2 * self.norm)
        return (delta_g * self.scale).sub_(torch.outer(delta_g @ g, g), alpha=coeff)

    def transpose(self, u: torch.Tensor) -> torch.Tensor:
        """J = s I − c g gᵀ / ((‖g‖ + ε)² ‖g‖) is symmetric (a multiple of the identity plus a multiple of
        g gᵀ), so Jᵀ u = J u; the identity when the clip is inactive."""
        if self.scale >= 1.0:
            return u.clone()
        g = self.grad.to(u.dtype)
        coeff = self.max_norm / ((self.norm + _NORM_EPS) ** 2 * self.norm)
        return (u * self.scale).sub_(torch.outer(u @ g, g), alpha=coeff)


class ValueClip(GradientClip):
    """``clip_grad_value_(clip_value)``: elementwise clamp to [−c, c]."""

    def __init__(self, grad: torch.Tensor, clip_value: float) -> None:
        super().__init__(grad)
        self.clip_value = float(clip_value)

    @property
    def clipped(self) -> torch.Tensor:
        return self.grad.clamp(-self.clip_value, self.clip_value)

    def perturb(self, delta_g: torch.Tensor, exact: bool) -> torch.Tensor:
        g = self.grad.to(delta_g.dtype)
        if exact:
            c = self.clip_value
            return (delta_g + g).clamp_(-c, c).sub_(g.clamp(-c, c))
        return delta_g.mul_((g.abs() < self.clip_value).to(delta_g.dtype))

    def transpose(self, u: torch.Tensor) -> torch.Tensor:
        """J is diagonal (1 where |g| < c, else 0: a clamped coordinate ignores its perturbation), hence
        symmetric: Jᵀ u = J u."""
        return u * (self.grad.abs() < self.clip_value).to(u.dtype)
