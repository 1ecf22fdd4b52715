"""``torch.optim.Adam`` (coupled L2 weight decay) and ``AdamW`` (decoupled), [concepts.md: One step].

Per group, with the factual post-step moments m, v, the step count c₀ after the update, bias
corrections bc1 = 1 − β1^c₀, bc2 = 1 − β2^c₀, m̂ = m/bc1, v̂ = v/bc2, D = √v̂ + ε, and ĝ the gradient
the moments consumed (g + λθ for Adam, g for AdamW), the linear forward map is::

    δĝ  = δg + λ δθ                                  (Adam; δĝ = δg for AdamW)
    δm' = β1 δm + (1 − β1) δĝ
    δv' = β2 δv + 2 (1 − β2) ĝ ⊙ δĝ
    δθ' = a δθ − η δm' / (bc1 D) + η c_v ⊙ δv',      c_v = m̂ / (2 √v̂ D² bc2)  (0 where v̂ = 0)

with a = 1 − ηλ for AdamW and 1 for Adam. When c₀ = 1 the optimizer state was just created, so the
counterfactual moments restart too: δm = δv = 0 before the update (a continued fit with a fresh
optimizer), in ``advance`` (both modes) and in ``transpose``.
"""

from __future__ import annotations

import math

import torch

from lightning_influence.optimizers.base import (
    FlatState,
    GroupStep,
    OptimizerJacobian,
    OptimizerStep,
    columns,
    is_empty,
)


def _linear_coefficients(step: OptimizerStep, g: GroupStep) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1/(bc1 D), c_v)``, each ``Tensor[r]`` over the group's region: the factors of δm' and δv' in δθ'."""
    assert step.exp_avg is not None and step.exp_avg_sq is not None  # an Adam step carries its moments
    bc1, bc2 = 1 - g.beta1**g.step, 1 - g.beta2**g.step
    m, v = step.exp_avg[g.region], step.exp_avg_sq[g.region]
    sqrt_v_hat = (v / bc2).sqrt()
    denom = sqrt_v_hat + g.eps
    # ∂/∂v of m̂/(√v̂+ε) is −m̂/(2√v̂(√v̂+ε)²)/bc2; the term is 0 where v̂ = 0
    safe = sqrt_v_hat.clamp(min=torch.finfo(v.dtype).tiny)
    coef_v = torch.where(sqrt_v_hat > 0, (m / bc1) / (2 * safe * denom**2 * bc2), 0.0)
    return 1 / (bc1 * denom), coef_v


class AdamJacobian(OptimizerJacobian):
    """``torch.optim.Adam`` with coupled L2 weight decay (``decoupled=False``) or AdamW (``decoupled=True``)."""

    blocks = ("theta", "m", "v")
    post_state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, decoupled: bool) -> None:
        self.decoupled = decoupled

    def _consumed_gradient(self, step: OptimizerStep, g: GroupStep) -> torch.Tensor:
        """ĝ over the group's region (``Tensor[r]``): the gradient Adam's moments consumed."""
        g_hat = columns(step.grad, g.region)
        if g.weight_decay and not self.decoupled:
            g_hat = g_hat + g.weight_decay * columns(step.theta, g.region)
        return g_hat

    def advance(self, states, delta_g, step, exact):
        assert step.exp_avg is not None and step.exp_avg_sq is not None
        # Every [c, p] operation is in place (on the states, on δg, or on one reused scratch buffer):
        # at large k the step is memory-bound and fresh [c, p] temporaries cost page faults.
        scratch = self._scratch_like(delta_g) if exact else None
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            d_g, d_th, d_m, d_v = (columns(t, r) for t in (delta_g, states["theta"], states["m"], states["v"]))
            if g.step == 1:  # fresh optimizer state: the counterfactual moments start from 0 as well
                d_m.zero_()
                d_v.zero_()
            if g.weight_decay and not self.decoupled:
                d_g.add_(d_th, alpha=g.weight_decay)
            d_m.lerp_(d_g, 1 - g.beta1)  # β1 δm + (1-β1) δĝ
            if self.decoupled and g.weight_decay:
                d_th.mul_(1 - g.lr * g.weight_decay)
            if exact:
                assert scratch is not None  # allocated above for the exact map
                self._advance_exact(d_th, d_m, d_v, d_g, columns(scratch, r), step, g)
            else:  # the [r] coefficients broadcast over the c rows
                inv_denom, coef_v = _linear_coefficients(step, g)
                d_v.mul_(g.beta2).addcmul_(d_g, self._consumed_gradient(step, g), value=2 * (1 - g.beta2))
                d_th.addcmul_(d_m, inv_denom, value=-g.lr)
                d_th.addcmul_(d_v, coef_v, value=g.lr)

    def _advance_exact(self, d_th, d_m, d_v, d_g, tmp, step: OptimizerStep, g: GroupStep) -> None:
        """The optimizer's own map on the counterfactual moments (δm already advanced; δg is consumed)."""
        assert step.exp_avg is not None and step.exp_avg_sq is not None  # checked by advance()
        bc1, bc2 = 1 - g.beta1**g.step, 1 - g.beta2**g.step
        m, v = columns(step.exp_avg, g.region), columns(step.exp_avg_sq, g.region)
        # counterfactual v' = β2 v'_prev + (1-β2)(ĝ+δĝ)²  ⇒  δv gains (1-β2)(2ĝ+δĝ)δĝ
        torch.add(d_g, self._consumed_gradient(step, g), alpha=2, out=tmp)
        d_v.mul_(g.beta2).addcmul_(tmp, d_g, value=1 - g.beta2)
        # δθ −= η [ (m+δm)/bc1 / (√((v+δv)/bc2) + ε) − m̂/(√v̂ + ε) ], with √bc2 moved out of the square
        # root so that the division fuses into one addcdiv. The factual term is computed by the same
        # operations, so that it cancels exactly where δ = 0 (a sample not yet seen keeps exactly 0).
        coef, eps_scaled = g.lr * math.sqrt(bc2) / bc1, g.eps * math.sqrt(bc2)
        factual_denom = v.clamp(min=0).sqrt_().add_(eps_scaled)
        torch.add(d_v, v, out=tmp).clamp_(min=0).sqrt_().add_(eps_scaled)
        torch.add(d_m, m, out=d_g)
        d_th.addcdiv_(d_g, tmp, value=-coef).addcdiv_(m, factual_denom, value=coef)  # [r] operands broadcast

    def transpose(self, adjoint, step):
        assert step.exp_avg is not None and step.exp_avg_sq is not None
        u = torch.zeros_like(adjoint["theta"])  # coordinates outside every group ignore δg
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            l_th, l_m, l_v, a_g = adjoint["theta"][:, r], adjoint["m"][:, r], adjoint["v"][:, r], u[:, r]
            inv_denom, coef_v = _linear_coefficients(step, g)
            # δθ' reads δm' and δv': their total adjoints
            l_m.addcmul_(l_th, inv_denom.expand_as(l_th), value=-g.lr)
            l_v.addcmul_(l_th, coef_v.expand_as(l_th), value=g.lr)
            # δm' and δv' read δĝ
            a_g.add_(l_m, alpha=1 - g.beta1)
            a_g.addcmul_(l_v, self._consumed_gradient(step, g).expand_as(l_v), value=2 * (1 - g.beta2))
            if self.decoupled and g.weight_decay:
                l_th.mul_(1 - g.lr * g.weight_decay)
            if g.weight_decay and not self.decoupled:  # δĝ = δg + λ δθ
                l_th.add_(a_g, alpha=g.weight_decay)
            if g.step == 1:  # the forward map zeroes the pre-step moments
                l_m.zero_()
                l_v.zero_()
            else:
                l_m.mul_(g.beta1)
                l_v.mul_(g.beta2)
        return u

    def _scratch_like(self, like: torch.Tensor) -> torch.Tensor:
        """A reusable ``Tensor[c, p]`` work buffer (kept across steps, grown when needed)."""
        buf: torch.Tensor | None = getattr(self, "_scratch", None)
        if (
            buf is None
            or buf.shape[0] < like.shape[0]
            or buf.shape[1:] != like.shape[1:]
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = self._scratch = torch.empty_like(like)
        return buf[: like.shape[0]]

    def apply(self, step: OptimizerStep, pre_state: FlatState):
        theta = step.theta.clone()
        m_new, v_new = torch.zeros_like(theta), torch.zeros_like(theta)
        m_prev, v_prev = pre_state.get("exp_avg"), pre_state.get("exp_avg_sq")
        for g in step.groups:
            r = g.region
            grad = step.grad[r]
            if g.weight_decay and self.decoupled:
                theta[r].mul_(1 - g.lr * g.weight_decay)
            elif g.weight_decay:
                grad = grad.add(step.theta[r], alpha=g.weight_decay)
            if g.step == 1 or m_prev is None or v_prev is None:  # fresh moments
                m, v = torch.zeros_like(grad), torch.zeros_like(grad)
            else:
                m, v = m_prev[r].clone(), v_prev[r].clone()
            # the operations of torch.optim.Adam's single-tensor step, in its order
            m.lerp_(grad, 1 - g.beta1)
            v.mul_(g.beta2).addcmul_(grad, grad, value=1 - g.beta2)
            bc1, bc2 = 1 - g.beta1**g.step, 1 - g.beta2**g.step
            denom = (v.sqrt() / math.sqrt(bc2)).add_(g.eps)
            theta[r].addcdiv_(m, denom, value=-g.lr / bc1)
            m_new[r], v_new[r] = m, v
        return theta, {"exp_avg": m_new, "exp_avg_sq": v_new}


class AdamWJacobian(AdamJacobian):
    """``torch.optim.AdamW``: Adam with decoupled weight decay, θ ← (1 − ηλ)θ − η m̂/(√v̂ + ε)."""

    def __init__(self) -> None:
        super().__init__(decoupled=True)
