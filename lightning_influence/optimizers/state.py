"""Reading a live ``torch.optim`` optimizer: which model fits it, its hyper-parameters at a step, and
its per-parameter state as flat tensors in the tracked-parameter layout. Nothing here knows Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from lightning_influence.errors import UnsupportedOptimizerError
from lightning_influence.optimizers.base import GroupStep, OptimizerJacobian
from lightning_influence.optimizers.registry import jacobian_for_kind

STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")

OptimizerModelName = Literal["auto", "sgd"]
"""``"auto"``: the real optimizer's Jacobian; ``"sgd"``: any optimizer modelled as plain SGD (the mismatch baseline)."""

_HINT = (
    " Supported exactly: torch.optim.SGD, Adam and AdamW (plain classes, not subclasses)."
    " To get the classic optimizer-mismatch approximation instead, pass optimizer_model='sgd'."
)


@dataclass
class OptimizerSpec:
    """What the tracker learnt about the user's optimizer at fit start."""

    jacobian: OptimizerJacobian
    kind: str  # "sgd" | "sgd-approx" | "adam" | "adamw"
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
    raise UnsupportedOptimizerError(
        f"Optimizer {kind.__module__}.{kind.__qualname__} cannot be modelled exactly.{_HINT}"
    )


def _model_adam(kind: type, groups: list[dict]) -> OptimizerSpec:
    if any(g.get("amsgrad") for g in groups):
        raise UnsupportedOptimizerError(
            f"{kind.__name__}(amsgrad=True) is not supported: the running maximum of v has no exact Jacobian the"
            f" tracker models.{_HINT}"
        )
    decoupled = [bool(g.get("decoupled_weight_decay", kind is torch.optim.AdamW)) for g in groups]
    if len(set(decoupled)) > 1:
        raise UnsupportedOptimizerError("Param groups mixing coupled and decoupled weight decay are not supported.")
    for g in groups:
        if isinstance(g.get("betas", (0, 0))[0], torch.Tensor) and g["betas"][0].requires_grad:
            raise UnsupportedOptimizerError("Differentiable (tensor) betas are not supported.")
    name = "adamw" if decoupled[0] else "adam"
    return OptimizerSpec(jacobian_for_kind(name), name)


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
        groups.append(read_group_step(group, region, step_count, first_momentum))
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
