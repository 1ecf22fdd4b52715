"""Optimizer models: how one step of SGD / Adam / AdamW moves a perturbation of its state.

Each model advances stacked per-sample perturbations of the optimizer state (``δθ``, ``δbuf``,
``δm``, ``δv``; each ``Tensor[c, p]``, one row per tracked sample) given the perturbation of the
batch gradient ``δg: Tensor[c, p]``, written exactly as PyTorch implements the step (SPEC §3).

``exact=False`` is the fully linear recursion (SGD-influence / AdamW-influence, estimator
``"first-order"``); ``exact=True`` applies the optimizer's own elementwise map to the
counterfactual moments (estimator ``"acc"``). For SGD and momentum the map is linear, so both agree.

Nothing here knows Lightning: a step is described by plain :class:`GroupStep` records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class UnsupportedOptimizerError(ValueError):
    """The optimizer, or one of its options, cannot be modelled exactly."""


@dataclass
class GroupStep:
    """Hyper-parameters of one param group at one optimizer step, read as the optimizer used them.

    ``region`` is the group's slice of the flat tracked-parameter vector. For Adam(W), ``step``
    is the step count *after* the update (c₀ in SPEC §3). For SGD with momentum,
    ``first_momentum_step`` says that the momentum buffer did not exist before this step.
    """

    region: slice
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    first_momentum_step: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    step: int = 1


@dataclass
class OptimizerStep:
    """One real optimizer step: per-group hyper-parameters and the factual flat tensors (``Tensor[p]``).

    ``theta`` are the pre-step parameters, ``grad`` the gradient the optimizer received,
    ``exp_avg`` / ``exp_avg_sq`` Adam's moments *after* the step (None for SGD).
    """

    groups: list[GroupStep]
    theta: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None

    def lr_vector(self) -> torch.Tensor:
        """``Tensor[p]``: the learning rate that applies to each coordinate."""
        lr = torch.empty_like(self.theta)
        for g in self.groups:
            lr[g.region] = g.lr
        return lr


class OptimizerJacobian:
    """Base class: ``blocks`` names the per-sample state blocks, ``advance`` moves them one step."""

    blocks: tuple[str, ...] = ("theta",)

    def advance(self, states: dict[str, torch.Tensor], delta_g: torch.Tensor, step: OptimizerStep, exact: bool) -> None:
        """Advance every block of ``states`` (each ``Tensor[c, p]``, modified in place) by one step.

        ``delta_g`` (``Tensor[c, p]``, may be overwritten) is the perturbation of the batch gradient
        at the pre-step parameters; ``states["theta"]`` holds δθ at the pre-step parameters on entry.
        """
        raise NotImplementedError

    def predict(self, step: OptimizerStep, pre_state: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """The factual post-step parameters ``Tensor[p]`` this model expects, from the pre-step
        parameters, the gradient and the pre-step optimizer state. Used by the tracker's self-check."""
        raise NotImplementedError


class SGDJacobian(OptimizerJacobian):
    """``torch.optim.SGD``: coupled weight decay, momentum with dampening, nesterov. Linear.

    ``momentum=False`` ignores any momentum in the groups (plain SGD, the ``optimizer_model="sgd"``
    approximation).
    """

    def __init__(self, momentum: bool) -> None:
        self.momentum = momentum
        self.blocks = ("theta", "buf") if momentum else ("theta",)

    def advance(self, states, delta_g, step, exact):
        d_theta = states["theta"]
        for g in step.groups:
            r = g.region
            d_grad = delta_g[:, r]
            if g.weight_decay:
                d_grad.add_(d_theta[:, r], alpha=g.weight_decay)
            if self.momentum and g.momentum:
                d_buf = states["buf"][:, r]
                if g.first_momentum_step:
                    d_buf.copy_(d_grad)
                else:
                    d_buf.mul_(g.momentum).add_(d_grad, alpha=1 - g.dampening)
                direction = d_grad.add_(d_buf, alpha=g.momentum) if g.nesterov else d_buf
            else:
                direction = d_grad
            d_theta[:, r].sub_(direction, alpha=g.lr)

    def predict(self, step, pre_state):
        theta = step.theta.clone()
        for g in step.groups:
            r = g.region
            d = step.grad[r] + g.weight_decay * step.theta[r]
            if self.momentum and g.momentum:
                buf = pre_state.get("momentum_buffer")
                buf = d if g.first_momentum_step or buf is None else g.momentum * buf[r] + (1 - g.dampening) * d
                d = d + g.momentum * buf if g.nesterov else buf
            theta[r] -= g.lr * d
        return theta


class AdamJacobian(OptimizerJacobian):
    """``torch.optim.Adam`` with coupled L2 weight decay (``decoupled=False``) or AdamW (``decoupled=True``)."""

    blocks = ("theta", "m", "v")

    def __init__(self, decoupled: bool) -> None:
        self.decoupled = decoupled

    def advance(self, states, delta_g, step, exact):
        assert step.exp_avg is not None and step.exp_avg_sq is not None
        d_theta, d_m, d_v = states["theta"], states["m"], states["v"]
        # Every [c, p] operation below is in place (on the states, on δg, or on one reused scratch
        # buffer): at large k the step is memory-bound and fresh [c, p] temporaries cost page faults.
        scratch = self._scratch_like(delta_g) if exact else None
        for g in step.groups:
            r = g.region
            if r.start == r.stop:
                continue
            bc1 = 1 - g.beta1**g.step
            bc2 = 1 - g.beta2**g.step
            m, v = step.exp_avg[r], step.exp_avg_sq[r]
            g_hat = step.grad[r]  # the gradient the moments consumed
            d_g, d_th, d_mr, d_vr = delta_g[:, r], d_theta[:, r], d_m[:, r], d_v[:, r]
            if g.weight_decay and not self.decoupled:
                g_hat = g_hat + g.weight_decay * step.theta[r]
                d_g.add_(d_th, alpha=g.weight_decay)
            d_mr.lerp_(d_g, 1 - g.beta1)  # β1 δm + (1-β1) δĝ
            if self.decoupled and g.weight_decay:
                d_th.mul_(1 - g.lr * g.weight_decay)
            if exact:
                tmp = scratch[:, r]
                # counterfactual v' = β2 v'_prev + (1-β2)(ĝ+δĝ)²  ⇒  δv gains (1-β2)(2ĝ+δĝ)δĝ
                torch.add(d_g, g_hat, alpha=2, out=tmp)
                d_vr.mul_(g.beta2).addcmul_(tmp, d_g, value=1 - g.beta2)
                # δθ −= η [ (m+δm)/bc1 / (√((v+δv)/bc2) + ε) − m̂/(√v̂ + ε) ], with √bc2 moved out of the
                # square root so that the division fuses into one addcdiv (δg is no longer needed)
                # The factual term is computed by the same operations, so that it cancels exactly where
                # δ = 0 (a sample not yet seen keeps a state of exactly 0).
                coef, eps_scaled = g.lr * math.sqrt(bc2) / bc1, g.eps * math.sqrt(bc2)
                factual_denom = v.clamp(min=0).sqrt().add_(eps_scaled)
                torch.add(d_vr, v, out=tmp).clamp_(min=0).sqrt_().add_(eps_scaled)
                torch.add(d_mr, m, out=d_g)
                d_th.addcdiv_(d_g, tmp, value=-coef).addcdiv_(m.expand_as(d_g), factual_denom.expand_as(d_g), value=coef)
            else:
                m_hat = m / bc1
                sqrt_v_hat = (v / bc2).sqrt()
                denom = sqrt_v_hat + g.eps
                d_vr.mul_(g.beta2).addcmul_(d_g, g_hat.expand_as(d_g), value=2 * (1 - g.beta2))
                # ∂/∂v of m̂/(√v̂+ε) is −m̂/(2√v̂(√v̂+ε)²)/bc2; the term is 0 where v̂ = 0
                safe = sqrt_v_hat.clamp(min=torch.finfo(v.dtype).tiny)
                coef_v = torch.where(sqrt_v_hat > 0, m_hat / (2 * safe * denom**2 * bc2), 0.0)
                d_th.addcmul_(d_mr, (1 / (bc1 * denom)).expand_as(d_mr), value=-g.lr)
                d_th.addcmul_(d_vr, coef_v.expand_as(d_vr), value=g.lr)

    def _scratch_like(self, like: torch.Tensor) -> torch.Tensor:
        """A reusable ``Tensor[c, p]`` work buffer (kept across steps, grown when needed)."""
        buf = getattr(self, "_scratch", None)
        if buf is None or buf.shape[0] < like.shape[0] or buf.shape[1:] != like.shape[1:] or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._scratch = torch.empty_like(like)
        return buf[: like.shape[0]]

    def predict(self, step, pre_state):
        theta = step.theta.clone()
        for g in step.groups:
            r = g.region
            grad = step.grad[r]
            if g.weight_decay and not self.decoupled:
                grad = grad + g.weight_decay * step.theta[r]
            m_prev, v_prev = pre_state.get("exp_avg"), pre_state.get("exp_avg_sq")
            m = (1 - g.beta1) * grad if m_prev is None else g.beta1 * m_prev[r] + (1 - g.beta1) * grad
            v = (1 - g.beta2) * grad**2 if v_prev is None else g.beta2 * v_prev[r] + (1 - g.beta2) * grad**2
            bc1, bc2 = 1 - g.beta1**g.step, 1 - g.beta2**g.step
            if self.decoupled:
                theta[r] *= 1 - g.lr * g.weight_decay
            theta[r] -= (g.lr / bc1) * m / (v.sqrt() / math.sqrt(bc2) + g.eps)
        return theta


@dataclass
class OptimizerSpec:
    """What the tracker learnt about the user's optimizer at fit start."""

    jacobian: OptimizerJacobian
    kind: str  # "sgd" | "adam" | "adamw"
    notes: list[str] = field(default_factory=list)


def model_optimizer(optimizer: torch.optim.Optimizer, optimizer_model: str = "auto") -> OptimizerSpec:
    """Pick the optimizer model for ``optimizer`` or raise :class:`UnsupportedOptimizerError`.

    ``optimizer_model="sgd"`` models any optimizer as plain SGD (learning rate and coupled weight
    decay per group, no momentum, no moments): the classic optimizer-mismatch baseline.
    """
    if optimizer_model not in ("auto", "sgd"):
        raise ValueError(f"optimizer_model must be 'auto' or 'sgd', got {optimizer_model!r}.")
    kind = type(optimizer)
    groups = optimizer.param_groups
    if any(g.get("maximize") for g in groups):
        raise UnsupportedOptimizerError(
            f"{kind.__name__}(maximize=True) is not supported: the tracker assumes the optimizer descends the loss."
        )
    if optimizer_model == "sgd":
        return OptimizerSpec(SGDJacobian(momentum=False), "sgd-approx", [f"{kind.__name__} modelled as plain SGD"])
    hint = (
        " Supported exactly: torch.optim.SGD, Adam and AdamW (plain classes, not subclasses)."
        " To get the classic optimizer-mismatch approximation instead, pass optimizer_model='sgd'."
    )

    def refuse_flag(flag: str, why: str) -> None:
        if any(g.get(flag) for g in groups):
            raise UnsupportedOptimizerError(f"{kind.__name__}({flag}=True) is not supported: {why}.{hint}")

    if kind is torch.optim.SGD:
        return OptimizerSpec(SGDJacobian(momentum=any(g.get("momentum", 0) for g in groups)), "sgd")
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        refuse_flag("amsgrad", "the running maximum of v has no exact Jacobian the tracker models")
        decoupled = [bool(g.get("decoupled_weight_decay", kind is torch.optim.AdamW)) for g in groups]
        if len(set(decoupled)) > 1:
            raise UnsupportedOptimizerError("Param groups mixing coupled and decoupled weight decay are not supported.")
        for g in groups:
            if isinstance(g.get("betas", (0, 0))[0], torch.Tensor) and g["betas"][0].requires_grad:
                raise UnsupportedOptimizerError("Differentiable (tensor) betas are not supported.")
        if decoupled[0]:
            return OptimizerSpec(AdamWJacobian(), "adamw")
        return OptimizerSpec(AdamJacobian(decoupled=False), "adam")
    raise UnsupportedOptimizerError(f"Optimizer {kind.__module__}.{kind.__qualname__} cannot be modelled exactly.{hint}")


def read_group_step(group: dict, region: slice, step_count: int, first_momentum_step: bool) -> GroupStep:
    """Hyper-parameters of one torch param group as they apply at this step (after schedulers)."""
    betas = group.get("betas", (0.9, 0.999))
    return GroupStep(
        region=region,
        lr=float(group["lr"]),
        weight_decay=float(group.get("weight_decay", 0.0) or 0.0),
        momentum=float(group.get("momentum", 0.0) or 0.0),
        dampening=float(group.get("dampening", 0.0) or 0.0),
        nesterov=bool(group.get("nesterov", False)),
        first_momentum_step=first_momentum_step,
        beta1=float(betas[0]),
        beta2=float(betas[1]),
        eps=float(group.get("eps", 1e-8)),
        step=step_count,
    )


class AdamWJacobian(AdamJacobian):
    """``torch.optim.AdamW``: Adam with decoupled weight decay, θ ← (1 − ηλ)θ − η m̂/(√v̂ + ε)."""

    def __init__(self) -> None:
        super().__init__(decoupled=True)
