"""``torch.optim.SGD``: coupled weight decay, momentum with dampening, nesterov ([concepts.md: One step]).

The step is linear in (θ, buf, g), so the perturbation's forward map is the same for ``exact`` and
not, and its transpose is exact. Per group, with η the learning rate, λ the weight decay, μ the
momentum and d the dampening::

    δĝ = δg + λ δθ
    δbuf' = δĝ (first momentum step)  or  μ δbuf + (1 − d) δĝ
    δdir = δĝ + μ δbuf' (nesterov)  or  δbuf'  (or δĝ without momentum)
    δθ' = δθ − η δdir
"""

from __future__ import annotations

import torch

from lightning_influence.optimizers.base import (
    FlatState,
    GroupStep,
    OptimizerJacobian,
    OptimizerStep,
    columns,
    is_empty,
)


class SGDJacobian(OptimizerJacobian):
    """``torch.optim.SGD``. ``momentum=False`` ignores any momentum in the groups (plain SGD, the
    ``optimizer_model="sgd"`` approximation); then the only state block is ``"theta"``."""

    def __init__(self, momentum: bool) -> None:
        self.momentum = momentum
        self.blocks = ("theta", "buf") if momentum else ("theta",)

    def _uses_buffer(self, g: GroupStep) -> bool:
        return bool(self.momentum and g.momentum)

    def advance(self, states, delta_g, step, exact):
        for g in step.groups:
            r = g.region
            d_grad, d_theta = columns(delta_g, r), columns(states["theta"], r)
            if g.weight_decay:
                d_grad.add_(d_theta, alpha=g.weight_decay)
            if self._uses_buffer(g):
                d_buf = columns(states["buf"], r)
                if g.first_momentum_step:
                    d_buf.copy_(d_grad)
                else:
                    d_buf.mul_(g.momentum).add_(d_grad, alpha=1 - g.dampening)
                direction = d_grad.add_(d_buf, alpha=g.momentum) if g.nesterov else d_buf
            else:
                direction = d_grad
            d_theta.sub_(direction, alpha=g.lr)

    def transpose(self, adjoint, step):
        lam_theta = adjoint["theta"]
        u = torch.zeros_like(lam_theta)  # coordinates outside every group ignore δg
        for g in step.groups:
            r = g.region
            if is_empty(r):
                continue
            a_dir = lam_theta[:, r] * -g.lr  # adjoint of δdir (a new tensor: λθ[r] is updated below)
            if self._uses_buffer(g):
                a_grad = self._transpose_momentum(adjoint["buf"][:, r], a_dir, g)
            else:
                a_grad = a_dir
            u[:, r] = a_grad
            if g.weight_decay:  # δĝ = δg + λ δθ: δθ also reaches the step through δĝ
                lam_theta[:, r].add_(a_grad, alpha=g.weight_decay)
        return u

    @staticmethod
    def _transpose_momentum(lam_buf: torch.Tensor, a_dir: torch.Tensor, g: GroupStep) -> torch.Tensor:
        """Given the adjoints of δbuf' (``lam_buf``, ``Tensor[c, r]``, overwritten with that of the
        pre-step δbuf) and of δdir, return the adjoint of δĝ."""
        a_buf_new = lam_buf + (a_dir * g.momentum if g.nesterov else a_dir)  # δbuf' feeds δθ' through δdir
        a_grad = a_dir.clone() if g.nesterov else torch.zeros_like(a_dir)
        if g.first_momentum_step:  # δbuf' = δĝ: the pre-step buffer does not exist
            a_grad.add_(a_buf_new)
            lam_buf.zero_()
        else:
            a_grad.add_(a_buf_new, alpha=1 - g.dampening)
            torch.mul(a_buf_new, g.momentum, out=lam_buf)
        return a_grad

    def apply(self, step: OptimizerStep, pre_state: FlatState):
        theta = step.theta.clone()
        buf_prev = pre_state.get("momentum_buffer")
        keeps_buffer = any(self._uses_buffer(g) for g in step.groups)
        # groups without momentum keep no buffer: zeros there, as flat_optimizer_state reads them
        buf_new = torch.zeros_like(theta) if keeps_buffer else None
        for g in step.groups:
            r = g.region
            d = step.grad[r]
            if g.weight_decay:
                d = d.add(step.theta[r], alpha=g.weight_decay)
            if self._uses_buffer(g):
                if g.first_momentum_step or buf_prev is None:
                    buf = d.clone()  # torch starts the buffer at the gradient, without dampening
                else:
                    buf = buf_prev[r].mul(g.momentum).add_(d, alpha=1 - g.dampening)
                assert buf_new is not None  # kept: this group uses the buffer
                buf_new[r] = buf
                d = d.add(buf, alpha=g.momentum) if g.nesterov else buf
            theta[r].add_(d, alpha=-g.lr)
        return theta, ({} if buf_new is None else {"momentum_buffer": buf_new})
