"""Reading a live ``torch.optim`` optimizer: which model fits it, its hyper-parameters at a step, and
its per-parameter state as flat tensors in the tracked-parameter layout. Nothing here knows Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from lightning_influence.errors import UnsupportedOptimizerError
from lightning_influence.optimizers.base import GroupStep, OptimizerJacobian
from lightning_influence.optimizers.registry import jacobian_for_kind

STATE_KEYS = (
    "exp_avg",
    "exp_avg_sq",
    "momentum_buffer",
    "max_exp_avg_sq",
    "square_avg",
    "grad_avg",
    "sum",
    "exp_inf",
)
"""The per-parameter state (``Tensor`` like the parameter) of every modelled optimizer: SGD's momentum buffer,
Adam(W)'s moments (and AMSGrad's maximum), RMSprop's ``square_avg`` / ``grad_avg`` / ``momentum_buffer``,
Adagrad's ``sum``, Adamax's ``exp_avg`` / ``exp_inf``, NAdam / RAdam's moments."""

OptimizerModelName = Literal["auto", "sgd"]
"""``"auto"``: the real optimizer's Jacobian; ``"sgd"``: any optimizer modelled as plain SGD (the mismatch baseline)."""

_HINT = (
    " Supported exactly: torch.optim.SGD, Adam and AdamW (amsgrad too), RMSprop, Adagrad, Adamax, NAdam and RAdam"
    " (plain classes, not subclasses)."
    " To get the classic optimizer-mismatch approximation instead, pass optimizer_model='sgd'."
)


@dataclass
class OptimizerSpec:
    """What the tracker learnt about the user's optimizer at fit start."""

    jacobian: OptimizerJacobian
    kind: str  # a kind of registry.OPTIMIZER_KINDS: "sgd" | "sgd-approx" | "adam" | "adamw" | "rmsprop" | ...
    notes: list[str] = field(default_factory=list)


def model_optimizer(optimizer: torch.optim.Optimizer, optimizer_model: OptimizerModelName = "auto") -> OptimizerSpec:
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
        return OptimizerSpec(jacobian_for_kind("sgd-approx"), "sgd-approx", [f"{kind.__name__} modelled as plain SGD"])
    if kind is torch.optim.SGD:
        return OptimizerSpec(jacobian_for_kind("sgd", any(g.get("momentum", 0) for g in groups)), "sgd")
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        return _model_adam(kind, groups)
    if kind in _FAMILIES:
        _refuse_flags(kind, groups)
        return _FAMILIES[kind](groups)
    raise UnsupportedOptimizerError(
        f"Optimizer {kind.__module__}.{kind.__qualname__} cannot be modelled exactly.{_HINT}"
    )


def _refuse_flags(kind: type, groups: list[dict]) -> None:
    """``UnsupportedOptimizerError`` for the options whose step the models do not follow."""
    for flag, why in _REFUSED_FLAGS.items():
        if any(g.get(flag) for g in groups):
            raise UnsupportedOptimizerError(f"{kind.__name__}({flag}=True) is not supported: {why}{_HINT}")


_REFUSED_FLAGS = {
    "differentiable": "the tracker reads the optimizer's state as constants and does not differentiate through the"
    " step. Construct the optimizer with differentiable=False (the default).",
    "capturable": "its step counts live on the device for CUDA graphs, which the tracker does not follow. Construct"
    " the optimizer with capturable=False (the default); foreach=True or fused=True are fast and supported.",
}


def _model_rmsprop(groups: list[dict]) -> OptimizerSpec:
    momentum = any(float(g.get("momentum", 0) or 0) > 0 for g in groups)
    name = "rmsprop-centered" if any(g.get("centered") for g in groups) else "rmsprop"
    return OptimizerSpec(jacobian_for_kind(name, momentum), name)


_FAMILIES: dict[type, Callable[[list[dict]], OptimizerSpec]] = {
    torch.optim.RMSprop: _model_rmsprop,
    torch.optim.Adagrad: lambda groups: OptimizerSpec(jacobian_for_kind("adagrad"), "adagrad"),
    torch.optim.Adamax: lambda groups: OptimizerSpec(jacobian_for_kind("adamax"), "adamax"),
    torch.optim.NAdam: lambda groups: OptimizerSpec(jacobian_for_kind("nadam"), "nadam"),
    torch.optim.RAdam: lambda groups: OptimizerSpec(jacobian_for_kind("radam"), "radam"),
}
"""The optimizer classes beyond SGD and Adam(W), each with the function that picks its model."""


def _model_adam(kind: type, groups: list[dict]) -> OptimizerSpec:
    decoupled = [bool(g.get("decoupled_weight_decay", kind is torch.optim.AdamW)) for g in groups]
    if len(set(decoupled)) > 1:
        raise UnsupportedOptimizerError("Param groups mixing coupled and decoupled weight decay are not supported.")
    for g in groups:
        if isinstance(g.get("betas", (0, 0))[0], torch.Tensor) and g["betas"][0].requires_grad:
            raise UnsupportedOptimizerError("Differentiable (tensor) betas are not supported.")
    name = "adamw" if decoupled[0] else "adam"
    if any(g.get("amsgrad") for g in groups):
        name += "-amsgrad"
    return OptimizerSpec(jacobian_for_kind(name), name)


def read_group_step(
    group: dict,
    region: slice,
    step_count: int,
    first_momentum_step: bool,
    mu_product: torch.Tensor | float | None = None,
) -> GroupStep:
    """Hyper-parameters of one torch param group as they apply at this step (after schedulers).

    ``mu_product``: NAdam's stored ``mu_product`` *before* the step (torch's 0-d tensor, whose dtype the product
    keeps), or None for the product a run with these hyper-parameters from step 1 holds. The record carries the
    product after the step, computed as torch does.
    """
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
        alpha=float(group.get("alpha", 0.99)),
        centered=bool(group.get("centered", False)),
        lr_decay=float(group.get("lr_decay", 0.0) or 0.0),
        initial_accumulator_value=float(group.get("initial_accumulator_value", 0.0) or 0.0),
        amsgrad=bool(group.get("amsgrad", False)),
        momentum_decay=float(group.get("momentum_decay", 0.004)),
        decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)),
        mu_product=_mu_product_after(group, step_count, mu_product) if "momentum_decay" in group else 1.0,
    )


def _mu_product_after(group: dict, step_count: int, before: torch.Tensor | float | None) -> float:
    """NAdam's μ_1⋯μ_c after step c = ``step_count``, with torch's operations (``mu_product *= mu`` on a 0-d
    tensor of the optimizer's scalar dtype: float64 under a float64 default dtype, else float32)."""
    beta1, decay = float(group.get("betas", (0.9, 0.999))[0]), float(group["momentum_decay"])

    def mu(step: int) -> float:
        return beta1 * (1.0 - 0.5 * (0.96 ** (float(step) * decay)))

    if isinstance(before, torch.Tensor):
        return float(before * mu(step_count))
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    product = torch.tensor(1.0 if before is None else before, dtype=scalar)
    for step in range(1 if before is None else step_count, step_count + 1):
        product = product * mu(step)
    return float(product)


def read_step_groups(
    optimizer: torch.optim.Optimizer, tracked_groups: Sequence[Sequence[torch.Tensor]], group_slices: Sequence[slice]
) -> list[GroupStep]:
    """The :class:`GroupStep` of every param group for the step the optimizer is *about* to take.

    Call it after the gradients are final and before ``optimizer.step()``. ``tracked_groups[i]`` are the
    tracked parameters of ``optimizer.param_groups[i]`` (possibly none) and ``group_slices[i]`` their
    slice of the flat vector. The Adam step count is the stored ``'step'`` + 1 (the count after this
    step; 1 when the state does not exist yet), and ``first_momentum_step`` says that no momentum
    buffer exists yet. Both are read from the group's first tracked parameter: untracked ones (frozen,
    or without gradient so far) may have no state of their own.
    """
    groups = []
    for group, region, tracked in zip(optimizer.param_groups, group_slices, tracked_groups):
        first_state = optimizer.state.get(tracked[0], {}) if tracked else {}
        step_count = int(first_state.get("step", 0)) + 1
        first_momentum = first_state.get("momentum_buffer") is None
        groups.append(read_group_step(group, region, step_count, first_momentum, first_state.get("mu_product")))
    return groups


def flat_optimizer_state(
    optimizer: torch.optim.Optimizer, tracked_params: Sequence[torch.Tensor], keys: Sequence[str] = STATE_KEYS
) -> dict[str, torch.Tensor | None]:
    """Flat copies (``Tensor[p]``, concatenated in ``tracked_params`` order) of the per-parameter state
    ``keys``: None for a key no tracked parameter has; zeros for the parameters that lack it (e.g. a
    group without momentum), which the models never read."""
    out: dict[str, torch.Tensor | None] = {}
    for key in keys:
        parts = [optimizer.state.get(p, {}).get(key) for p in tracked_params]
        if all(t is None for t in parts):
            out[key] = None
            continue
        flat = [torch.zeros_like(p) if t is None else t for p, t in zip(tracked_params, parts)]
        with torch.no_grad():  # cat copies: later steps do not change it
            out[key] = torch.cat([t.reshape(-1) for t in flat])
    return out
