"""``torch.optim.Adam`` / ``AdamW`` with ``amsgrad=True``: Adam whose denominator is the running maximum of v
([concepts.md: One step]; the Adam part is :mod:`~lightning_influence.optimizers.adam`'s).

Per group, with the step count c₀ after the update, bc1 = 1 − β1^c₀, bc2 = 1 − β2^c₀, the factual post-step
moments m, v and their running maximum v̄ (``max_exp_avg_sq``), the step is

    m' = β1 m + (1 − β1) ĝ,   v' = β2 v + (1 − β2) ĝ²,   v̄' = max(v̄, v'),   θ' = a θ − η (m'/bc1) / (√(v̄'/bc2) + ε)

(ĝ = g + λθ and a = 1 for Adam, ĝ = g and a = 1 − ηλ for AdamW). The maximum picks, per coordinate, the
*running* branch (v̄ > v') or the *new* one. The linear forward map follows the branch that won, ties going to
the new one (v' = v̄': the running maximum never strictly exceeded it)::

    δv̄' = δv'  (new branch)   or   δv̄  (running branch)

and is otherwise Adam's with v̄' in place of v'. The branch is read off the factual post-step state, exactly
(``max_exp_avg_sq`` is a copy of either value). ``exact=True`` takes the maximum of the counterfactual
candidates, max(v̄ + δv̄, v' + δv'); it needs the pre-step v̄, which the model takes from the previous step it
advanced (see :class:`~.base.PreviousStep`); where that is unknown (the first step after a resume) and the new
branch won, it assumes the running maximum tied (an upper bound). When the step count is 1 the state was just
created: δm = δv = δv̄ = 0 before the update. A group with ``amsgrad=False`` is plain Adam.
"""

from __future__ import annotations

import math

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
    sqrt_slope,
    zero_if_fresh,
)


class AMSGradJacobian(OptimizerJacobian):
    """``torch.optim.Adam(amsgrad=True)`` (``decoupled=False``) or ``AdamW(amsgrad=True)`` (``decoupled=True``).
    State blocks: ``"theta"``, ``"m"``, ``"v"``, ``"vmax"`` (``max_exp_avg_sq``)."""

    blocks = ("theta", "m", "v", "vmax")
    post_state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, decoupled: bool) -> None:
        self.decoupled = decoupled
        self.previous = PreviousStep()

    def _factual(self, step: OptimizerStep, g: GroupStep):
        """``(ĝ, m', v', denominator source, new-branch mask)`` over the group's region (``Tensor[r]`` each): the
        denominator reads v̄' (amsgrad groups) or v' (the others, where the mask is all True)."""
        post = step.post_state
        m, v = (columns(post[k], g.region) for k in ("exp_avg", "exp_avg_sq"))  # type: ignore[arg-type]
        vmax = columns(post["max_exp_avg_sq"], g.region) if g.amsgrad else v  # type: ignore[arg-type]
        return consumed_gradient(step, g, coupled=not self.decoupled), m, v, vmax, v >= vmax

    def _coefficients(self, m: torch.Tensor, vmax: torch.Tensor, g: GroupStep) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1/(bc1 D), c_v)`` (``Tensor[r]``): δθ' gains −η δm'/(bc1 D) + η c_v ⊙ δv̄'."""
        bc1, bc2 = 1 - g.beta1**g.step, 1 - g.beta2**g.step
        root = (vmax / bc2).sqrt()
        denom = root + g.eps
        return 1 / (bc1 * denom), (m / bc1) * sqrt_slope(root, bc2) / denom**2

    def advance(self, states, delta_g, step, exact):
        self.previous.see(step)
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            d_g, d_th, d_m, d_v, d_vm = (
                columns(t, r) for t in (delta_g, states["theta"], states["m"], states["v"], states["vmax"])
            )
            zero_if_fresh(g, d_m, d_v, d_vm)
            g_hat, m, v, vmax, new = self._factual(step, g)
            if g.weight_decay and not self.decoupled:
                d_g.add_(d_th, alpha=g.weight_decay)
            d_m.lerp_(d_g, 1 - g.beta1)
            if self.decoupled and g.weight_decay:
                d_th.mul_(1 - g.lr * g.weight_decay)
            if exact:
                d_v.mul_(g.beta2).addcmul_(d_g + 2 * g_hat, d_g, value=1 - g.beta2)
                if g.amsgrad:
                    before = torch.zeros_like(v) if fresh(g) else self.previous.pre_state(step, g, "max_exp_avg_sq")
                    running = vmax if before is None else before  # unknown: the running maximum tied
                    winner = torch.maximum(running, v)
                    d_vm.copy_(torch.maximum(d_vm + running, d_v + v).sub_(winner))
                else:
                    winner = v
                    d_vm = d_v
                bc1, bc2 = 1 - g.beta1**g.step, 1 - g.beta2**g.step
                coef, eps_scaled = g.lr * math.sqrt(bc2) / bc1, g.eps * math.sqrt(bc2)
                cf_denom = (d_vm + winner).clamp_(min=0).sqrt_().add_(eps_scaled)
                d_th.sub_((d_m + m) / cf_denom - m / winner.clamp(min=0).sqrt().add_(eps_scaled), alpha=coef)
            else:
                d_v.mul_(g.beta2).addcmul_(d_g, g_hat, value=2 * (1 - g.beta2))
                if g.amsgrad:
                    d_vm.copy_(torch.where(new, d_v, d_vm))
                else:
                    d_vm = d_v
                inv_denom, coef_v = self._coefficients(m, vmax, g)
                d_th.addcmul_(d_m, inv_denom, value=-g.lr).addcmul_(d_vm, coef_v, value=g.lr)

    def transpose(self, adjoint, step):
        u = torch.zeros_like(adjoint["theta"])
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            l_th, l_m, l_v, l_vm = (adjoint[b][:, r] for b in ("theta", "m", "v", "vmax"))
            g_hat, m, _, vmax, new = self._factual(step, g)
            inv_denom, coef_v = self._coefficients(m, vmax, g)
            l_m.addcmul_(l_th, inv_denom.expand_as(l_th), value=-g.lr)  # total adjoints of δm' and δv̄'
            if g.amsgrad:
                l_vm.addcmul_(l_th, coef_v.expand_as(l_th), value=g.lr)
                l_v.add_(torch.where(new, l_vm, 0.0))  # the total adjoint of δv'
                l_vm.copy_(torch.where(new, 0.0, l_vm))
            else:
                l_v.addcmul_(l_th, coef_v.expand_as(l_th), value=g.lr)
            a_g = l_m * (1 - g.beta1)
            a_g.addcmul_(l_v, g_hat.expand_as(l_v), value=2 * (1 - g.beta2))
            if self.decoupled and g.weight_decay:
                l_th.mul_(1 - g.lr * g.weight_decay)
            if g.weight_decay and not self.decoupled:
                l_th.add_(a_g, alpha=g.weight_decay)
            if fresh(g):
                for t in (l_m, l_v, l_vm):
                    t.zero_()
            else:
                l_m.mul_(g.beta1)
                l_v.mul_(g.beta2)
            u[:, r] = a_g
        return u

    def apply(self, step: OptimizerStep, pre_state: FlatState):
        theta = step.theta.clone()
        post = {k: torch.zeros_like(theta) for k in self.post_state_keys}
        prev = [pre_state.get(k) for k in self.post_state_keys]
        for g in step.groups:
            r = g.region
            grad = step.grad[r]
            if g.weight_decay and self.decoupled:
                theta[r].mul_(1 - g.lr * g.weight_decay)
            elif g.weight_decay:
                grad = grad.add(step.theta[r], alpha=g.weight_decay)
            if fresh(g) or any(t is None for t in prev[: 3 if g.amsgrad else 2]):
                m, v, vmax = (torch.zeros_like(grad) for _ in range(3))
            else:
                m, v = (t[r].clone() for t in prev[:2])  # type: ignore[index]
                vmax = prev[2][r].clone() if g.amsgrad else torch.zeros_like(grad)  # type: ignore[index]
            # the operations of torch.optim.Adam's single-tensor step, in its order
            m.lerp_(grad, 1 - g.beta1)
            v.mul_(g.beta2).addcmul_(grad, grad, value=1 - g.beta2)
            bc1, bc2 = 1 - g.beta1**g.step, 1 - g.beta2**g.step
            if g.amsgrad:
                vmax = torch.maximum(vmax, v)
                denom = (vmax.sqrt() / bc2**0.5).add_(g.eps)
            else:
                denom = (v.sqrt() / bc2**0.5).add_(g.eps)
            theta[r].addcdiv_(m, denom, value=-(g.lr / bc1))
            post["exp_avg"][r], post["exp_avg_sq"][r], post["max_exp_avg_sq"][r] = m, v, vmax
        return theta, post
