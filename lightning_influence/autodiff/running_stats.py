"""Running statistics (BatchNorm's running mean and variance, train mode) as part of the state ([concepts.md: Random
draws and batch-coupled layers]).

In train mode a BatchNorm normalises with the batch's own statistics and, as a side effect, moves its buffers,

    r ← (1 − μ) r + μ s(θ)        s = (mean, unbiased variance) of its input over the batch, per channel,

once per call (μ its ``momentum``). The training loss does not read r, so the parameters' dynamics are unchanged;
the buffers are a second output of each step. Over one optimizer step (its micro-batches' forwards, every call of
every layer in order) they move as r_{t+1} = d ⊙ r_t + u_t(θ_t), with d = (1 − μ)^calls per entry and u_t the same
fold started from r = 0, so a perturbation moves as

    δr_{t+1} = d ⊙ δr_t + J_u δθ_t

and an eval-mode query f(θ, r) scores ⟨∇_θ f, δθ_T⟩ + ⟨∇_r f, δr_T⟩. The sample's weight w_j does not enter s
(the sample stays in the batch and its statistics: SPEC §9), so the buffers carry no source term.
:class:`RunningStatistics` names the buffers and lays them out in one flat vector of length q;
:class:`StepStatistics` is one step's u_t with its derivatives. Nothing here knows Lightning.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_influence.autodiff.per_sample import rows_backward
from lightning_influence.errors import InfluenceConfigurationError

LossesFn = Callable[[torch.Tensor, Any], torch.Tensor]  # (θ, batch) -> per-sample losses, the training forward


@dataclass(frozen=True)
class RunningStatistics:
    """The running buffers the training forward moves: ``names[i]`` is a BatchNorm in train mode with
    ``sizes[i]`` channels and momentum ``momenta[i]``. The flat vector (length :attr:`numel` = q) holds, layer by
    layer, its running mean then its running variance."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    momenta: tuple[float, ...]

    @classmethod
    def of(cls, module: nn.Module) -> RunningStatistics | None:
        """The train-mode BatchNorm layers of ``module`` that keep running statistics (None: there are none).
        A cumulative average (``momentum=None``) is refused: its factor depends on a count the tracker does not
        follow."""
        layers = [(n, m) for n, m in module.named_modules() if _moves_buffers(m)]
        if not layers:
            return None
        cumulative = [n for n, m in layers if m.momentum is None]
        if cumulative:
            raise InfluenceConfigurationError(
                f"BatchNorm {cumulative[0]!r} has momentum=None (a cumulative average of the batch statistics): the"
                " tracker propagates running statistics with a fixed momentum only. Pass momentum=0.1 (the default)"
                " or another number, or put the layer in eval mode."
            )
        return cls(
            tuple(n for n, _ in layers), tuple(int(m.num_features) for _, m in layers),
            tuple(float(m.momentum or 0.0) for _, m in layers),  # None refused above
        )  # fmt: skip

    @property
    def numel(self) -> int:
        return 2 * sum(self.sizes)

    @property
    def buffer_names(self) -> list[str]:
        """``["bn.running_mean", "bn.running_var", ...]``, in the flat vector's order."""
        return [f"{n}.{b}" for n in self.names for b in ("running_mean", "running_var")]

    def read(self, module: nn.Module, frozen: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The buffers' values, ``Tensor[q]``: from ``frozen`` where it holds them, else from ``module``."""
        own = dict(module.named_buffers())
        return torch.cat([(frozen or {}).get(n, own[n]).reshape(-1) for n in self.buffer_names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat: Tensor[q]`` by buffer name (differentiable), to pass as frozen values."""
        sizes = [s for s in self.sizes for _ in range(2)]
        return dict(zip(self.buffer_names, flat.split(sizes)))

    def with_values(self, frozen: dict[str, torch.Tensor] | None, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``frozen`` with the buffers set to ``flat: Tensor[q]``."""
        return {**(frozen or {}), **self.unflatten(flat)}

    def step(self, module: nn.Module, losses_of: LossesFn, theta: torch.Tensor, batches: Sequence[Any]):
        """One optimizer step's buffer map at ``theta`` (:class:`StepStatistics`), built from the micro-batches'
        training forwards ``losses_of(θ, batch)`` (which replay their draws), with a graph for its derivatives."""
        leaf = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            update, decay = self.fold(module, losses_of, leaf, batches)
        return StepStatistics(update, decay, leaf)

    def fold(
        self, module: nn.Module, losses_of: LossesFn, theta: torch.Tensor, batches: Sequence[Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u(θ): Tensor[q], d: Tensor[q])``: the step's buffer update r ↦ d ⊙ r + u(θ), every call of every layer
        folded in order over the micro-batches ``batches``."""
        calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in self.names}
        with _capturing(module, calls):
            for batch in batches:
                losses_of(theta, batch)
        updates, decays = [], []
        for name, size, momentum in zip(self.names, self.sizes, self.momenta):
            mean = var = torch.zeros(size, dtype=theta.dtype, device=theta.device)
            for m, v in calls[name]:
                mean, var = (1 - momentum) * mean + momentum * m, (1 - momentum) * var + momentum * v
            decay = torch.full((size,), (1 - momentum) ** len(calls[name]), dtype=theta.dtype, device=theta.device)
            updates += [mean, var]
            decays += [decay, decay]
        return torch.cat(updates), torch.cat(decays)


@dataclass
class StepStatistics:
    """One step's buffer map r ↦ ``decay`` ⊙ r + u(θ) at θ_t: ``update`` = u(θ_t) (``Tensor[q]``, with its graph to
    the leaf ``theta``)."""

    update: torch.Tensor
    decay: torch.Tensor
    theta: torch.Tensor

    def jvp(self, directions: torch.Tensor) -> torch.Tensor:
        """``J_u V``: ``Tensor[c, q]`` for ``directions: Tensor[c, p]``, as the transpose of the VJP a ↦ J_uᵀ a, which
        is linear in a (reverse mode only: every kernel has it, and the graph replays the step's draws)."""
        with torch.enable_grad():
            a = torch.zeros_like(self.update, requires_grad=True)
            (jt_a,) = torch.autograd.grad(self.update, self.theta, a, create_graph=True, retain_graph=True)
            return rows_backward(jt_a, a, directions.to(jt_a), create_graph=False).detach()

    def vjp(self, adjoints: torch.Tensor) -> torch.Tensor:
        """``J_uᵀ W``: ``Tensor[c, p]`` for ``adjoints: Tensor[c, q]``."""
        with torch.enable_grad():
            return rows_backward(self.update, self.theta, adjoints.to(self.update), create_graph=False).detach()

    def advance(self, states: torch.Tensor, directions: torch.Tensor) -> None:
        """``states ← decay ⊙ states + J_u directions`` in place (``states: Tensor[c, q]``, pre-step
        ``directions: Tensor[c, p]``)."""
        moved = self.jvp(directions).to(states.dtype)
        states.mul_(self.decay.to(states)).add_(moved)


def _moves_buffers(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and module.training and module.track_running_stats


@contextmanager
def _capturing(module: nn.Module, calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> Iterator[None]:
    """Record each call's batch statistics (per-channel mean and unbiased variance of its input) of the layers named
    in ``calls``, differentiable in the parameters."""

    def hook(name: str) -> Callable[..., None]:
        def record(_: nn.Module, inputs: tuple[torch.Tensor, ...], __: Any) -> None:
            x = inputs[0]
            dims = [0, *range(2, x.dim())]
            calls[name].append((x.mean(dim=dims), x.var(dim=dims, correction=1)))

        return record

    modules = dict(module.named_modules())
    handles = [modules[name].register_forward_hook(hook(name)) for name in calls]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def batch_statistics_only(layers: Sequence[_BatchNorm]) -> Iterator[None]:
    """The train-mode ``layers`` normalise with the batch's statistics, as in training, without moving their running
    buffers: the tracker evaluates a step's loss many times, and the run's buffers must move once, by the run itself
    (an eval-mode layer reads its running statistics either way)."""
    kept = [(m, m.track_running_stats) for m in layers]
    for m, _ in kept:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, tracking in kept:
            m.track_running_stats = tracking


@contextmanager
def differentiable_running_stats(module: nn.Module) -> Iterator[None]:
    """Eval-mode BatchNorm computed by its formula, (x − mean) / √(var + ε) · γ + β, whose derivative in the running
    buffers exists (the fused kernel refuses one): for a query's gradient with respect to them."""
    layers = batch_norm_layers(module)
    for m in layers:
        m.forward = types.MethodType(_batch_norm_formula, m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def _batch_norm_formula(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if self.training:  # batch statistics: the layer's own forward
        return type(self).forward(self, x)
    shape = [1, -1] + [1] * (x.dim() - 2)
    assert self.running_mean is not None and self.running_var is not None  # tracking layers only
    y = (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)
    return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def batch_norm_layers(module: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm of ``module`` that keeps running statistics (in any mode)."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
