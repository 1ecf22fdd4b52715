"""Which parameters are tracked, and reading them (values, gradients) as one flat vector.

The tracked parameters are the trainable parameters of the optimizer (all, or those selected by
``params=``), ordered by optimizer param group so that each group owns one contiguous slice of the
flat vector (:class:`~lightning_influence.autodiff.functional.FlatParameters`). Trainable parameters that are
not tracked are constants of the counterfactual: their values are read at every step. Nothing here
knows Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_influence.autodiff.layout import FlatParameters
from lightning_influence.autodiff.running_stats import RunningStatistics
from lightning_influence.errors import InfluenceConfigurationError


@dataclass(frozen=True)
class TrackedParameters:
    """The tracked parameters per optimizer param group, their flat layout, and the untracked trainable ones."""

    groups: tuple[tuple[nn.Parameter, ...], ...]
    layout: FlatParameters
    untracked: dict[str, nn.Parameter]
    running: dict[str, torch.Tensor] = field(default_factory=dict)
    """The running buffers the training forward moves (BatchNorm in train mode), by name: part of the state."""

    @property
    def flat(self) -> list[nn.Parameter]:
        """Every tracked parameter in layout order."""
        return [p for group in self.groups for p in group]

    @property
    def device(self) -> torch.device:
        return self.flat[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.flat[0].dtype

    def theta(self) -> torch.Tensor:
        """θ now: a flat ``Tensor[p]`` copy."""
        with torch.no_grad():  # no graph, and no detach per parameter (one dispatch each, every step)
            return self.layout.flatten(self.flat)

    def frozen(self, running: bool = True) -> dict[str, torch.Tensor]:
        """Copies of the untracked trainable parameters' values ``{name: Tensor}``, and of the running buffers' (now)
        unless ``running`` is False."""
        frozen = {n: p.detach().clone() for n, p in self.untracked.items()}
        if running:
            frozen.update((n, b.detach().clone()) for n, b in self.running.items())
        return frozen

    def grad(self, step: int) -> torch.Tensor | None:
        """The flat gradient ``Tensor[p]``; None when no tracked parameter has one (the step is skipped)."""
        if all(p.grad is None for p in self.flat):
            return None
        grads: list[torch.Tensor] = []
        for name, p in zip(self.layout.names, self.flat):
            if p.grad is None:
                raise InfluenceConfigurationError(
                    f"Parameter {name!r} received no gradient at step {step}, so the optimizer skipped it."
                    " Exclude parameters the loss does not use (params=...)."
                )
            grads.append(p.grad)
        with torch.no_grad():
            return self.layout.flatten(grads)

    def other_grad_sq_norm(self, optimizer: torch.optim.Optimizer) -> float:
        """Squared norm of the gradients of the optimizer's untracked parameters (they enter a global clip norm)."""
        tracked = {id(p) for p in self.flat}
        return sum(
            float(p.grad.double().pow(2).sum())
            for group in optimizer.param_groups
            for p in group["params"]
            if id(p) not in tracked and p.grad is not None
        )


def _wanted_ids(module: nn.Module, selectors: Sequence[str | nn.Module] | str | nn.Module) -> set[int]:
    """Ids of the parameters that the ``params=`` selectors name (name prefixes or submodules)."""
    named = dict(module.named_parameters())
    owned = {id(p) for p in named.values()}
    wanted: set[int] = set()
    for sel in [selectors] if isinstance(selectors, (str, nn.Module)) else list(selectors):
        if isinstance(sel, nn.Module):
            found = {id(p) for p in sel.parameters()}
            if not found <= owned:
                raise InfluenceConfigurationError(
                    f"params= selector {type(sel).__name__} is not a submodule of {type(module).__name__}."
                )
        elif isinstance(sel, str):
            found = {id(p) for n, p in named.items() if n == sel or n.startswith(sel + ".")}
        else:
            raise TypeError(f"params= takes name prefixes or nn.Module objects, got {type(sel).__name__}.")
        if not found:
            raise InfluenceConfigurationError(f"params= selector {sel!r} matches no parameter of the module.")
        wanted |= found
    return wanted


def select_parameters(
    module: nn.Module, optimizer: torch.optim.Optimizer, params: Sequence[str | nn.Module] | str | nn.Module | None
) -> TrackedParameters:
    """The tracked parameters of ``module`` that ``optimizer`` trains, per param group (``params=None``: all)."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    wanted = None if params is None else _wanted_ids(module, params)
    groups, names, seen = [], [], set()
    for group in optimizer.param_groups:
        chosen = []
        for p in group["params"]:
            if not p.requires_grad or (wanted is not None and id(p) not in wanted):
                continue
            if id(p) not in name_of:
                raise InfluenceConfigurationError("The optimizer holds a parameter that is not part of the module.")
            chosen.append((name_of[id(p)], p))
            seen.add(id(p))
        groups.append(tuple(p for _, p in chosen))
        names.append(chosen)
    if wanted is not None and (missing := wanted - seen):
        unused = sorted(name_of[i] for i in missing if i in name_of)
        raise InfluenceConfigurationError(
            f"Parameters {unused[:5]} are selected for tracking but the optimizer does not train them (or they are"
            " frozen). Track only parameters the optimizer updates."
        )
    if not seen:
        raise InfluenceConfigurationError("No trainable parameter to track: the optimizer holds none.")
    untracked = {n: p for n, p in module.named_parameters() if p.requires_grad and id(p) not in seen}
    stats = RunningStatistics.of(module)
    buffers = dict(module.named_buffers())
    running = {n: buffers[n] for n in ([] if stats is None else stats.buffer_names)}
    return TrackedParameters(tuple(groups), FlatParameters.from_groups(names), untracked, running)
