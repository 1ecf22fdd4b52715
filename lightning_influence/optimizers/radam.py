"""``torch.optim.RAdam``: Adam with a rectified adaptive rate; coupled or decoupled weight decay
([concepts.md: One step]; the moments are :mod:`~lightning_influence.optimizers.moments`').

Per group, with the step count c₀ after the update, bc1 = 1 − β1^c₀, bc2 = 1 − β2^c₀, ρ∞ = 2/(1 − β2) − 1 and
ρ = ρ∞ − 2 c₀ β2^c₀ / bc2, the step subtracts from aθ

    U = (m'/bc1) η √bc2 / (√v' + ε) · r        (ρ > 5, rectified; r = √((ρ−4)(ρ−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρ)))
    U = (m'/bc1) η                              (ρ ≤ 5)

The branch depends on c₀ and β2 only: a factual constant of the step, which a perturbation does not change. Then
k_g = 0, k_m = ∂U/∂m' and k_v = −∂U/∂v' = U / (√v' + ε) · 1/(2√v') (0 where v' = 0, and on the ρ ≤ 5 branch).
"""

from __future__ import annotations

import math

from lightning_influence.optimizers.base import GroupStep, sqrt_slope
from lightning_influence.optimizers.moments import MomentsJacobian


def rectification(g: GroupStep) -> float | None:
    """r of the group's step, or None on the unrectified branch (ρ ≤ 5)."""
    step = g.step
    bc2 = 1 - g.beta2**step
    rho_inf = 2 / (1 - g.beta2) - 1
    rho = rho_inf - 2 * step * (g.beta2**step) / bc2
    if rho <= 5.0:
        return None
    return ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5


class RAdamJacobian(MomentsJacobian):
    """``torch.optim.RAdam`` (``foreach`` computes the same step; each group's ``decoupled_weight_decay``)."""

    def update(self, g, g_hat, m, v):
        bc1, rect = 1 - g.beta1**g.step, rectification(g)
        corrected = m / bc1
        if rect is None:
            return corrected * g.lr
        adaptive = ((1 - g.beta2**g.step) ** 0.5) / v.sqrt().add_(g.eps)
        return corrected * g.lr * adaptive * rect

    def slopes(self, g, g_hat, m, v):
        bc1, rect = 1 - g.beta1**g.step, rectification(g)
        if rect is None:
            return 0.0, g.lr / bc1, 0.0
        root = v.sqrt()
        denom = root + g.eps
        scale = g.lr * math.sqrt(1 - g.beta2**g.step) * rect / bc1
        return 0.0, scale / denom, scale * m / denom**2 * sqrt_slope(root)
