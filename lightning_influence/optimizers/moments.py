"""The Adam-style moments that ``torch.optim.NAdam`` and ``RAdam`` share: the map of one step with the θ update left
to the subclass ([concepts.md: One step]).

Per group, with ĝ = g + λθ (coupled weight decay) or g (``decoupled_weight_decay=True``, then a = 1 − ηλ, else
a = 1), the factual post-step moments m, v and the update U(ĝ, m', v') that the step subtracts from aθ, the
linear forward map is::

    δĝ  = δg + λ δθ                                          (coupled; δĝ = δg decoupled)
    δm' = β1 δm + (1 − β1) δĝ
    δv' = β2 δv + 2 (1 − β2) ĝ ⊙ δĝ
    δθ' = a δθ − k_g ⊙ δĝ − k_m ⊙ δm' + k_v ⊙ δv'           (k: the partial derivatives of −U, signs made explicit)

and ``exact=True`` is δθ' = a δθ − (U(ĝ + δĝ, m' + δm', v' + δv') − U(ĝ, m', v')), with the moments' own exact
update. When the step count is 1 the state was just created: δm = δv = 0 before the update.
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
    zero_if_fresh,
)


class MomentsJacobian(OptimizerJacobian):
    """Base of NAdam and RAdam: the subclass gives the update U (:meth:`update`) and its partial derivatives
    (:meth:`slopes`). State blocks ``"theta"``, ``"m"`` (``exp_avg``), ``"v"`` (``exp_avg_sq``)."""

    blocks = ("theta", "m", "v")
    post_state_keys = ("exp_avg", "exp_avg_sq")

    def update(self, g: GroupStep, g_hat: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """U (``Tensor[..., r]``): what the step subtracts from aθ, with torch's operations in torch's order."""
        raise NotImplementedError

    def slopes(self, g: GroupStep, g_hat: torch.Tensor, m: torch.Tensor, v: torch.Tensor):
        """``(k_g, k_m, k_v)`` (``Tensor[r]`` or float): ∂U/∂ĝ, ∂U/∂m' and −∂U/∂v' at the factual point."""
        raise NotImplementedError

    @staticmethod
    def _factual(step: OptimizerStep, g: GroupStep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ĝ, m', v')`` over the group's region, each ``Tensor[r]``."""
        m, v = (columns(step.post_state[k], g.region) for k in ("exp_avg", "exp_avg_sq"))  # type: ignore[arg-type]
        return consumed_gradient(step, g, coupled=not g.decoupled_weight_decay), m, v

    def advance(self, states, delta_g, step, exact):
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            d_g, d_th, d_m, d_v = (columns(t, r) for t in (delta_g, states["theta"], states["m"], states["v"]))
            zero_if_fresh(g, d_m, d_v)
            g_hat, m, v = self._factual(step, g)
            if g.weight_decay and not g.decoupled_weight_decay:
                d_g.add_(d_th, alpha=g.weight_decay)
            d_m.lerp_(d_g, 1 - g.beta1)
            if g.decoupled_weight_decay and g.weight_decay:
                d_th.mul_(1 - g.lr * g.weight_decay)
            if exact:
                d_v.mul_(g.beta2).addcmul_(d_g + 2 * g_hat, d_g, value=1 - g.beta2)
                d_th.sub_(self.update(g, d_g + g_hat, d_m + m, d_v + v) - self.update(g, g_hat, m, v))
            else:
                d_v.mul_(g.beta2).addcmul_(d_g, g_hat, value=2 * (1 - g.beta2))
                k_g, k_m, k_v = self.slopes(g, g_hat, m, v)
                d_th.sub_(k_g * d_g).sub_(k_m * d_m).add_(k_v * d_v)

    def transpose(self, adjoint, step):
        u = torch.zeros_like(adjoint["theta"])
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            l_th, l_m, l_v = (adjoint[b][:, r] for b in ("theta", "m", "v"))
            g_hat, m, v = self._factual(step, g)
            k_g, k_m, k_v = self.slopes(g, g_hat, m, v)
            l_m.sub_(k_m * l_th)  # total adjoints of δm' and δv'
            l_v.add_(k_v * l_th)
            a_g = l_m * (1 - g.beta1) - k_g * l_th
            a_g.addcmul_(l_v, g_hat.expand_as(l_v), value=2 * (1 - g.beta2))
            if g.decoupled_weight_decay and g.weight_decay:
                l_th.mul_(1 - g.lr * g.weight_decay)
            elif g.weight_decay:
                l_th.add_(a_g, alpha=g.weight_decay)
            if fresh(g):
                l_m.zero_()
                l_v.zero_()
            else:
                l_m.mul_(g.beta1)
                l_v.mul_(g.beta2)
            u[:, r] = a_g
        return u

    def apply(self, step: OptimizerStep, pre_state: FlatState):
        theta = step.theta.clone()
        post = {"exp_avg": torch.zeros_like(theta), "exp_avg_sq": torch.zeros_like(theta)}
        m_prev, v_prev = pre_state.get("exp_avg"), pre_state.get("exp_avg_sq")
        for g in step.groups:
            r = g.region
            grad = step.grad[r]
            if g.weight_decay and g.decoupled_weight_decay:
                theta[r].mul_(1 - g.lr * g.weight_decay)
            elif g.weight_decay:
                grad = grad.add(step.theta[r], alpha=g.weight_decay)
            if fresh(g) or m_prev is None or v_prev is None:
                m, v = torch.zeros_like(grad), torch.zeros_like(grad)
            else:
                m, v = m_prev[r].clone(), v_prev[r].clone()
            m.lerp_(grad, 1 - g.beta1)
            v.mul_(g.beta2).addcmul_(grad, grad, value=1 - g.beta2)
            theta[r].sub_(self.update(g, grad, m, v))
            post["exp_avg"][r], post["exp_avg_sq"][r] = m, v
        return theta, post
