"""``torch.optim.Adamax``: Adam with an infinity-norm second moment, coupled weight decay ([concepts.md: One step]).

Per group, with the step count c₀ after the update, bc1 = 1 − β1^c₀, ĝ = g + λθ and the factual post-step
state m (``exp_avg``) and u (``exp_inf``), the step is

    m' = β1 m + (1 − β1) ĝ,    u' = max(β2 u, |ĝ| + ε),    θ' = θ − (η / bc1) m' / u'.

The maximum picks a branch per coordinate: the *decayed* one (β2 u > |ĝ| + ε) or the *fresh* one. The linear
forward map follows the branch that won, with ties going to the fresh one (u' = |ĝ| + ε: the decayed value
never strictly exceeded it), and with d|ĝ|/dĝ = sign(ĝ) (0 at ĝ = 0, as autograd's)::

    δĝ  = δg + λ δθ
    δm' = β1 δm + (1 − β1) δĝ
    δu' = sign(ĝ) ⊙ δĝ  (fresh branch)   or   β2 δu  (decayed branch)
    δθ' = δθ − (η / bc1) (δm' / u' − m' / u'² ⊙ δu')

The branch is read off the factual post-step state: u' equals |ĝ| + ε (recomputed, to within 8 ulps) on the
fresh branch. ``exact=True`` takes the maximum of the counterfactual candidates, max(β2 (u + δu), |ĝ + δĝ| + ε);
it needs the pre-step u, which the model takes from the previous step it advanced (see
:class:`~.base.PreviousStep`); where that is unknown (the first step after a resume) and the fresh branch won,
it assumes the decayed value tied (an upper bound). When the step count is 1 the state was just created:
δm = δu = 0 before the update.
"""

from __future__ import annotations

import torch

from lightning_influence.optimizers.base import (
    FlatState,
    GroupStep,
    OptimizerJacobian,
    OptimizerStep,
    PreviousStep,
    columns,
    consumed_gradient,
    fresh,
    is_empty,
    zero_if_fresh,
)

ULPS = 8
"""How close (in units of the last place) the recomputed |ĝ| + ε must be to u' for the fresh branch to count as won."""


def fresh_branch(candidate: torch.Tensor, winner: torch.Tensor) -> torch.Tensor:
    """``BoolTensor[r]``: where the running maximum ``winner`` (``Tensor[r]``) is the fresh ``candidate`` (ties
    included), to within :data:`ULPS` ulps of rounding in the recomputed candidate."""
    return candidate >= winner * (1 - ULPS * torch.finfo(winner.dtype).eps)


class AdamaxJacobian(OptimizerJacobian):
    """``torch.optim.Adamax`` (``foreach`` computes the same step). State blocks: ``"theta"``, ``"m"``
    (``exp_avg``), ``"u"`` (``exp_inf``)."""

    blocks = ("theta", "m", "u")
    post_state_keys = ("exp_avg", "exp_inf")

    def __init__(self) -> None:
        self.previous = PreviousStep()

    @staticmethod
    def _factual(step: OptimizerStep, g: GroupStep):
        """``(ĝ, |ĝ| + ε, m', u')`` over the group's region, each ``Tensor[r]``."""
        g_hat = consumed_gradient(step, g)
        m, u = (columns(step.post_state[k], g.region) for k in ("exp_avg", "exp_inf"))  # type: ignore[arg-type]
        return g_hat, g_hat.abs().add_(g.eps), m, u

    def advance(self, states, delta_g, step, exact):
        self.previous.see(step)
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            d_g, d_th, d_m, d_u = (columns(t, r) for t in (delta_g, states["theta"], states["m"], states["u"]))
            zero_if_fresh(g, d_m, d_u)
            g_hat, candidate, m, u = self._factual(step, g)
            if g.weight_decay:
                d_g.add_(d_th, alpha=g.weight_decay)
            d_m.lerp_(d_g, 1 - g.beta1)
            rate = g.lr / (1 - g.beta1**g.step)
            if exact:
                before = torch.zeros_like(u) if fresh(g) else self.previous.pre_state(step, g, "exp_inf")
                decayed = u if before is None else before * g.beta2  # unknown: the decayed value tied
                winner = torch.maximum(decayed, candidate)  # u', recomputed with the counterfactual's operations
                cf = torch.maximum(d_u.mul_(g.beta2).add_(decayed), (d_g + g_hat).abs_().add_(g.eps))
                d_u.copy_(cf.sub_(winner))
                d_th.sub_((d_m + m) / (winner + d_u) - m / winner, alpha=rate)
            else:
                d_u.copy_(torch.where(fresh_branch(candidate, u), g_hat.sign() * d_g, g.beta2 * d_u))
                d_th.sub_(d_m / u - (m / u**2) * d_u, alpha=rate)

    def transpose(self, adjoint, step):
        lam_theta = adjoint["theta"]
        u_adj = torch.zeros_like(lam_theta)
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            g_hat, candidate, m, u = self._factual(step, g)
            l_th, l_m, l_u = lam_theta[:, r], adjoint["m"][:, r], adjoint["u"][:, r]
            rate = g.lr / (1 - g.beta1**g.step)
            l_m.addcdiv_(l_th, u.expand_as(l_th), value=-rate)  # total adjoints of δm' and δu'
            l_u.addcmul_(l_th, (m / u**2).expand_as(l_th), value=rate)
            won = fresh_branch(candidate, u)
            a_g = l_m * (1 - g.beta1) + torch.where(won, g_hat.sign() * l_u, 0.0)
            l_m.mul_(g.beta1)
            l_u.copy_(torch.where(won, 0.0, g.beta2 * l_u))
            if fresh(g):
                l_m.zero_()
                l_u.zero_()
            u_adj[:, r] = a_g
            if g.weight_decay:
                l_th.add_(a_g, alpha=g.weight_decay)
        return u_adj

    def apply(self, step: OptimizerStep, pre_state: FlatState):
        theta = step.theta.clone()
        post = {"exp_avg": torch.zeros_like(theta), "exp_inf": torch.zeros_like(theta)}
        for g in step.groups:
            r = g.region
            grad = step.grad[r]
            if g.weight_decay:
                grad = grad.add(step.theta[r], alpha=g.weight_decay)
            m_prev, u_prev = pre_state.get("exp_avg"), pre_state.get("exp_inf")
            if fresh(g) or m_prev is None or u_prev is None:
                m, u = torch.zeros_like(grad), torch.zeros_like(grad)
            else:
                m, u = m_prev[r].clone(), u_prev[r].clone()
            # the operations of torch.optim.Adamax's single-tensor step, in its order
            m.lerp_(grad, 1 - g.beta1)
            u = torch.maximum(u.mul_(g.beta2), grad.abs().add_(g.eps))
            theta[r].addcdiv_(m, u, value=-(g.lr / (1 - g.beta1**g.step)))
            post["exp_avg"][r], post["exp_inf"][r] = m, u
        return theta, post
