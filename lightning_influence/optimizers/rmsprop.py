"""``torch.optim.RMSprop``: coupled weight decay, momentum, centered ([concepts.md: One step]).

Per group, with η the learning rate, α the smoothing constant, λ the weight decay, μ the momentum, ĝ = g + λθ
the gradient the state consumed, the factual post-step state v (``square_avg``), a (``grad_avg``, centered
only), s = v − a² (centered) or v, D = √s + ε and q = ĝ / D, the step is

    v' = α v + (1 − α) ĝ²,   a' = α a + (1 − α) ĝ,   buf' = μ buf + q (μ > 0),   θ' = θ − η buf'  (or θ − η q)

and the linear forward map of a perturbation is::

    δĝ   = δg + λ δθ
    δv'  = α δv + 2 (1 − α) ĝ ⊙ δĝ
    δa'  = α δa + (1 − α) δĝ                            (centered)
    δs   = δv' − 2 a' ⊙ δa'                             (centered; δs = δv' otherwise)
    δq   = δĝ / D − c ⊙ δs,       c = ĝ / (2 √s D²)    (0 where s = 0)
    δbuf' = μ δbuf + δq,  δθ' = δθ − η δbuf'            (μ > 0; δθ' = δθ − η δq otherwise)

``exact=True`` applies the same update to the counterfactual state (v + δv, a + δa). When the step count is 1
the state was just created: δv = δa = δbuf = 0 before the update.
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


def _denominator(v: torch.Tensor, a: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(√s, √s + ε)`` (``Tensor[...]``) from v and a (None when not centered), with torch's operations."""
    root = v.addcmul(a, a, value=-1).sqrt_() if a is not None else v.sqrt()
    return root, root + eps


class RMSpropJacobian(OptimizerJacobian):
    """``torch.optim.RMSprop``. ``momentum`` / ``centered``: some group uses momentum / is centered, which adds
    the state block ``"buf"`` (``momentum_buffer``) / ``"g_avg"`` (``grad_avg``) to ``"theta"`` and ``"v"``
    (``square_avg``); each group follows its own flags."""

    def __init__(self, momentum: bool, centered: bool = False) -> None:
        self.momentum, self.centered = momentum, centered
        self.blocks = ("theta", "v", *(("buf",) if momentum else ()), *(("g_avg",) if centered else ()))
        self.post_state_keys = ("square_avg", *(("grad_avg",) if centered else ()))

    def _flags(self, g: GroupStep) -> tuple[bool, bool]:
        """(this group keeps a momentum buffer, this group is centered)."""
        return bool(self.momentum and g.momentum > 0), bool(self.centered and g.centered)

    def _factual(self, step: OptimizerStep, g: GroupStep):
        """``(ĝ, a', √s, D)`` over the group's region (``Tensor[r]`` each; a' None when not centered)."""
        v = columns(step.post_state["square_avg"], g.region)  # type: ignore[arg-type]
        a = columns(step.post_state["grad_avg"], g.region) if self._flags(g)[1] else None  # type: ignore[arg-type]
        root, denom = _denominator(v, a, g.eps)
        return consumed_gradient(step, g), a, root, denom

    def advance(self, states, delta_g, step, exact):
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            uses_buf, centered = self._flags(g)
            d_g, d_th, d_v = (columns(t, r) for t in (delta_g, states["theta"], states["v"]))
            d_buf = columns(states["buf"], r) if uses_buf else None
            d_a = columns(states["g_avg"], r) if centered else None
            zero_if_fresh(g, d_v, *(t for t in (d_buf, d_a) if t is not None))
            g_hat, a, root, denom = self._factual(step, g)
            if g.weight_decay:
                d_g.add_(d_th, alpha=g.weight_decay)
            if d_a is not None:
                d_a.lerp_(d_g, 1 - g.alpha)  # linear: exact in both modes
            if exact:
                d_v.mul_(g.alpha).addcmul_(d_g + 2 * g_hat, d_g, value=1 - g.alpha)
                v = columns(step.post_state["square_avg"], r)
                _, cf_denom = _denominator(d_v + v, None if a is None or d_a is None else d_a + a, g.eps)
                d_q = (d_g + g_hat) / cf_denom - g_hat / denom  # the factual term cancels exactly where δ = 0
            else:
                d_v.mul_(g.alpha).addcmul_(d_g, g_hat, value=2 * (1 - g.alpha))
                d_s = d_v if a is None or d_a is None else d_v - 2 * a * d_a
                d_q = d_g / denom - (g_hat * sqrt_slope(root) / denom**2) * d_s
            if d_buf is not None:
                d_th.sub_(d_buf.mul_(g.momentum).add_(d_q), alpha=g.lr)
            else:
                d_th.sub_(d_q, alpha=g.lr)

    def transpose(self, adjoint, step):
        lam_theta = adjoint["theta"]
        u = torch.zeros_like(lam_theta)
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            uses_buf, centered = self._flags(g)
            g_hat, a, root, denom = self._factual(step, g)
            l_th, l_v = lam_theta[:, r], adjoint["v"][:, r]
            if uses_buf:  # δθ' = δθ − η δbuf',  δbuf' = μ δbuf + δq
                l_buf = adjoint["buf"][:, r]
                a_q = l_buf.sub_(l_th, alpha=g.lr).clone()
                l_buf.mul_(g.momentum)
            else:
                a_q = l_th * -g.lr
            a_s = a_q * -(g_hat * sqrt_slope(root) / denom**2)
            a_g = a_q / denom
            l_v.add_(a_s)  # the total adjoint of δv'
            a_g.addcmul_(l_v, g_hat.expand_as(l_v), value=2 * (1 - g.alpha))
            l_v.mul_(g.alpha)
            if centered and a is not None:
                l_a = adjoint["g_avg"][:, r]
                l_a.addcmul_(a_s, a.expand_as(a_s), value=-2)
                a_g.add_(l_a, alpha=1 - g.alpha)
                l_a.mul_(g.alpha)
            if fresh(g):  # the forward map zeroes the pre-step state
                l_v.zero_()
                for name, used in (("buf", uses_buf), ("g_avg", centered)):
                    if used:
                        adjoint[name][:, r].zero_()
            u[:, r] = a_g
            if g.weight_decay:
                l_th.add_(a_g, alpha=g.weight_decay)
        return u

    def apply(self, step: OptimizerStep, pre_state: FlatState):
        theta = step.theta.clone()
        post = {"square_avg": torch.zeros_like(theta)}
        if self.centered:
            post["grad_avg"] = torch.zeros_like(theta)
        if self.momentum:
            post["momentum_buffer"] = torch.zeros_like(theta)

        def previous(key: str, r: slice, g: GroupStep) -> torch.Tensor:
            prev = pre_state.get(key)
            return torch.zeros_like(theta[r]) if fresh(g) or prev is None else prev[r].clone()

        for g in step.groups:
            r = g.region
            uses_buf, centered = self._flags(g)
            grad = step.grad[r]
            if g.weight_decay:
                grad = grad.add(step.theta[r], alpha=g.weight_decay)
            # the operations of torch.optim.RMSprop's single-tensor step, in its order
            v = previous("square_avg", r, g).mul_(g.alpha).addcmul_(grad, grad, value=1 - g.alpha)
            post["square_avg"][r] = v
            if centered:
                a = previous("grad_avg", r, g).lerp_(grad, 1 - g.alpha)
                post["grad_avg"][r] = a
                avg = v.addcmul(a, a, value=-1).sqrt_()
            else:
                avg = v.sqrt()
            avg = avg.add_(g.eps)
            if uses_buf:
                buf = previous("momentum_buffer", r, g).mul_(g.momentum).addcdiv_(grad, avg)
                post["momentum_buffer"][r] = buf
                theta[r].add_(buf, alpha=-g.lr)
            else:
                theta[r].addcdiv_(grad, avg, value=-g.lr)
        return theta, post
