"""``torch.optim.Adagrad``: learning-rate decay, coupled weight decay, initial accumulator ([concepts.md: One step]).

Per group, with the step count c₀ after the update, the decayed rate η_c = η / (1 + (c₀ − 1) κ) (κ = ``lr_decay``),
ĝ = g + λθ, the factual post-step accumulator S (``sum``) and D = √S + ε, the step is
S' = S + ĝ², θ' = θ − η_c ĝ / D, and the linear forward map of a perturbation is::

    δĝ  = δg + λ δθ
    δS' = δS + 2 ĝ ⊙ δĝ
    δθ' = δθ − η_c (δĝ / D − c ⊙ δS'),       c = ĝ / (2 √S D²)   (0 where S = 0)

``exact=True`` applies the same update to the counterfactual accumulator S + δS. torch creates the accumulator
(at ``initial_accumulator_value``) with the optimizer: when the step count is 1 the counterfactual one starts
there too, δS = 0 before the update.
"""

from __future__ import annotations

import torch

from lightning_influence.optimizers.base import (
    FlatState,
    GroupStep,
    OptimizerJacobian,
    OptimizerStep,
    columns,
    consumed_gradient,
    fresh,
    is_empty,
    sqrt_slope,
    zero_if_fresh,
)


def decayed_lr(g: GroupStep) -> float:
    """η / (1 + (c₀ − 1) κ), the rate torch's Adagrad uses at step count c₀."""
    return g.lr / (1 + (g.step - 1) * g.lr_decay)


class AdagradJacobian(OptimizerJacobian):
    """``torch.optim.Adagrad`` (``foreach`` and ``fused`` compute the same step). State blocks: ``"theta"``,
    ``"sum"``."""

    blocks = ("theta", "sum")
    post_state_keys = ("sum",)

    @staticmethod
    def _factual(step: OptimizerStep, g: GroupStep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ĝ, S', √S', D)`` over the group's region, each ``Tensor[r]``."""
        total = columns(step.post_state["sum"], g.region)  # type: ignore[arg-type]
        root = total.sqrt()
        return consumed_gradient(step, g), total, root, root + g.eps

    def advance(self, states, delta_g, step, exact):
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            d_g, d_th, d_s = (columns(t, r) for t in (delta_g, states["theta"], states["sum"]))
            zero_if_fresh(g, d_s)
            g_hat, total, root, denom = self._factual(step, g)
            if g.weight_decay:
                d_g.add_(d_th, alpha=g.weight_decay)
            if exact:
                d_s.addcmul_(d_g + 2 * g_hat, d_g)
                d_q = (d_g + g_hat) / (total + d_s).sqrt_().add_(g.eps) - g_hat / denom
            else:
                d_s.addcmul_(d_g, g_hat, value=2)
                d_q = d_g / denom - (g_hat * sqrt_slope(root) / denom**2) * d_s
            d_th.sub_(d_q, alpha=decayed_lr(g))

    def transpose(self, adjoint, step):
        lam_theta = adjoint["theta"]
        u = torch.zeros_like(lam_theta)
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            g_hat, _, root, denom = self._factual(step, g)
            l_th, l_s = lam_theta[:, r], adjoint["sum"][:, r]
            a_q = l_th * -decayed_lr(g)
            l_s.addcmul_(a_q, (g_hat * sqrt_slope(root) / denom**2).expand_as(a_q), value=-1)  # total adjoint of δS'
            a_g = a_q / denom
            a_g.addcmul_(l_s, g_hat.expand_as(l_s), value=2)
            if fresh(g):
                l_s.zero_()
            u[:, r] = a_g
            if g.weight_decay:
                l_th.add_(a_g, alpha=g.weight_decay)
        return u

    def apply(self, step: OptimizerStep, pre_state: FlatState):
        theta = step.theta.clone()
        post = torch.zeros_like(theta)
        prev = pre_state.get("sum")
        for g in step.groups:
            r = g.region
            grad = step.grad[r]
            if g.weight_decay:
                grad = grad.add(step.theta[r], alpha=g.weight_decay)
            # the operations of torch.optim.Adagrad's single-tensor step, in its order
            total = torch.full_like(grad, g.initial_accumulator_value) if prev is None else prev[r].clone()
            total.addcmul_(grad, grad, value=1)
            std = total.sqrt().add_(g.eps)
            theta[r].addcdiv_(grad, std, value=-decayed_lr(g))
            post[r] = total
        return theta, {"sum": post}
