"""``torch.optim.NAdam``: Adam with Nesterov momentum and a momentum schedule; coupled or decoupled weight decay
([concepts.md: One step]; the moments are :mod:`~lightning_influence.optimizers.moments`').

Per group, with the step count c₀ after the update, ψ = ``momentum_decay``, μ_c = β1 (1 − ½ · 0.96^(c ψ)),
Π = μ_1⋯μ_c₀ (the product torch stores after this step, :attr:`GroupStep.mu_product`), bc2 = 1 − β2^c₀ and
D = √(v'/bc2) + ε, the step subtracts from aθ

    U = c_g ĝ / D + c_m m' / D,     c_g = η (1 − μ_c₀) / (1 − Π),   c_m = η μ_{c₀+1} / (1 − Π μ_{c₀+1}),

so that k_g = c_g / D, k_m = c_m / D and k_v = U / D · ∂D/∂v' (∂D/∂v' = 1 / (2 bc2 √(v'/bc2)), 0 where v' = 0).
μ and Π are factual constants of the step: a perturbation does not change them.
"""

from __future__ import annotations

from lightning_influence.optimizers.base import GroupStep, sqrt_slope
from lightning_influence.optimizers.moments import MomentsJacobian


def nadam_mu(g: GroupStep, step: int) -> float:
    """μ_step = β1 (1 − ½ · 0.96^(step ψ)), as torch computes it."""
    return g.beta1 * (1.0 - 0.5 * (0.96 ** (step * g.momentum_decay)))


def _coefficients(g: GroupStep) -> tuple[float, float]:
    """``(c_g, c_m)`` of the group's step."""
    mu, mu_next = nadam_mu(g, g.step), nadam_mu(g, g.step + 1)
    return g.lr * (1.0 - mu) / (1.0 - g.mu_product), g.lr * mu_next / (1.0 - g.mu_product * mu_next)


class NAdamJacobian(MomentsJacobian):
    """``torch.optim.NAdam`` (``foreach`` computes the same step; each group's ``decoupled_weight_decay``)."""

    def update(self, g, g_hat, m, v):
        c_g, c_m = _coefficients(g)
        denom = (v / (1 - g.beta2**g.step)).sqrt().add_(g.eps)
        return g_hat / denom * c_g + m / denom * c_m

    def slopes(self, g, g_hat, m, v):
        c_g, c_m = _coefficients(g)
        bc2 = 1 - g.beta2**g.step
        root = (v / bc2).sqrt()
        denom = root + g.eps
        total = (g_hat * c_g + m * c_m) / denom
        return c_g / denom, c_m / denom, total / denom * sqrt_slope(root, bc2)
