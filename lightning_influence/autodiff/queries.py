"""Query functions f(θ) and their gradients at given tracked parameters.

A query is one of
- a batch: f = mean per-sample loss over it (the same ``loss_fn`` as training);
- an iterable of batches (a DataLoader): f = mean per-sample loss over all its samples;
- a callable ``f(module) -> scalar``: anything differentiable (a prediction, a margin, a metric).

Batch and DataLoader queries are evaluated the way Lightning validates: the model in eval mode (dropout off,
running statistics used); a callable decides for itself (it gets the model in whatever mode training left it).
Scores use ⟨∇f(θ), δθ_j⟩, so only ∇f is needed. Nothing here knows Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
from torch.func import grad

from lightning_influence.autodiff.functional import FunctionalLoss

Query = Any  # a batch, an iterable of batches, or a callable(module) -> scalar
MoveFn = Callable[[Any], Any]


def is_batch(query: Any) -> bool:
    """A collated batch: a tensor, or a tuple/list/dict whose leaves include tensors."""
    if isinstance(query, torch.Tensor):
        return True
    if isinstance(query, Mapping):
        return any(isinstance(v, torch.Tensor) for v in query.values())
    if isinstance(query, (tuple, list)):
        return len(query) > 0 and any(isinstance(v, torch.Tensor) for v in query)
    return False


def _batches(query: Query) -> list[Any]:
    if is_batch(query):
        return [query]
    if isinstance(query, Iterable) and not isinstance(query, (str, bytes)):
        return list(query)
    raise TypeError(
        f"A query must be a batch, a DataLoader (iterable of batches) or a callable(module) -> scalar;"
        f" got {type(query).__name__}."
    )


def query_gradient(
    loss: FunctionalLoss, theta: torch.Tensor, query: Query, move: MoveFn, frozen: dict | None = None
) -> torch.Tensor:
    """``∇f(θ)``: ``Tensor[p]`` for the query's mean loss (or the callable's value)."""
    if _is_callable_query(query):
        return _callable_gradient(loss, theta, query, frozen)

    def summed(t: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        losses = loss.per_sample_losses(t, batch, frozen)
        return losses.sum(), losses

    total, count = torch.zeros_like(theta), 0
    for batch in _batches(query):
        with loss.evaluating():
            g, losses = grad(summed, has_aux=True)(theta, move(batch))  # one forward gives both
        total += g
        count += losses.shape[0]
    if count == 0:
        raise ValueError("The query holds no samples.")
    return total / count


def query_example_gradients(
    loss: FunctionalLoss, theta: torch.Tensor, query: Query, move: MoveFn, frozen: dict | None = None
) -> torch.Tensor:
    """Per-example gradients ``Tensor[n, p]`` of every sample of a batch / DataLoader query."""
    if _is_callable_query(query):
        return _callable_gradient(loss, theta, query, frozen).unsqueeze(0)
    with loss.evaluating():
        return torch.cat([loss.sample_gradients(theta, move(batch), frozen=frozen) for batch in _batches(query)])


def _is_callable_query(query: Query) -> bool:
    return callable(query) and not is_batch(query) and not isinstance(query, Iterable)


def _callable_gradient(loss: FunctionalLoss, theta: torch.Tensor, fn: Callable, frozen: dict | None) -> torch.Tensor:
    return grad(lambda t: _callable_value(loss, t, fn, frozen))(theta)


class QueryEvaluator:
    """Query gradients for one fit: the registered queries by name, and any other query.

    Args:
        loss: the functional loss of the tracked parameters.
        registered: ``{name: batch or DataLoader or callable}``.
        move: puts a query batch where the module computes (its precision and device, read at call time).
    """

    def __init__(self, loss: FunctionalLoss, registered: Mapping[str, Query], move: MoveFn) -> None:
        self.loss = loss
        self.registered = dict(registered)
        self.move = move

    def resolve(self, query: Query) -> Query:
        """A registered name becomes its query; anything else is returned as it is."""
        if isinstance(query, str):
            if query not in self.registered:
                raise KeyError(f"No registered query named {query!r}; registered: {sorted(self.registered)}.")
            return self.registered[query]
        return query

    def gradient(self, query: Query, theta: torch.Tensor, frozen: dict | None = None) -> torch.Tensor:
        """``∇f(θ)``: ``Tensor[p]``."""
        with torch.enable_grad():
            return query_gradient(self.loss, theta, self.resolve(query), self.move, frozen)

    def example_gradients(self, query: Query, theta: torch.Tensor, frozen: dict | None = None) -> torch.Tensor:
        """Per-example gradients ``Tensor[n, p]``."""
        with torch.enable_grad():
            return query_example_gradients(self.loss, theta, self.resolve(query), self.move, frozen)

    def probe(self, query: Query, theta: torch.Tensor, frozen: dict | None = None) -> QueryProbe:
        """``query`` (a registered name, or any query) at the parameters ``theta``."""
        return QueryProbe(self, query, theta, frozen)

    def registered_gradients(self, theta: torch.Tensor, frozen: dict | None = None) -> dict[str, torch.Tensor]:
        """``{name: ∇q(θ)}`` for every registered query."""
        return {name: self.gradient(name, theta, frozen) for name in self.registered}


def _values(loss: FunctionalLoss, query: Query, move: MoveFn, frozen: dict | None, per_example: bool):
    """``f(θ)`` as a function of θ: the mean per-sample loss over the query's batches (``Tensor[n]`` of its
    per-sample losses with ``per_example``), or the callable's scalar value."""
    if _is_callable_query(query):
        if per_example:
            raise ValueError("per_example=True needs a batch or a DataLoader query, not a callable.")
        return lambda t: _callable_value(loss, t, query, frozen)
    batches = [move(batch) for batch in _batches(query)]

    def value(t: torch.Tensor) -> torch.Tensor:
        with loss.evaluating():
            losses = torch.cat([loss.per_sample_losses(t, batch, frozen) for batch in batches])
        return losses if per_example else losses.mean()

    return value


def _callable_value(loss: FunctionalLoss, theta: torch.Tensor, fn: Callable, frozen: dict | None) -> torch.Tensor:
    out = loss.call(theta, fn, frozen=frozen)
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        raise ValueError("A callable query must return a scalar tensor, e.g. the loss or one logit.")
    return out.reshape(())


class QueryProbe:
    """One query at one parameter point θ (``Tensor[p]``, with the untracked parameters' values): what an
    estimator asks of it, computed on demand — ∇f(θ) for projections, or f(θ + δ) − f(θ) for the exact
    counterfactuals."""

    def __init__(self, evaluator: QueryEvaluator, query: Query, theta: torch.Tensor, frozen: dict | None) -> None:
        self.evaluator, self.query, self.theta, self.frozen = evaluator, evaluator.resolve(query), theta, frozen

    def gradient(self) -> torch.Tensor:
        """``∇f(θ)``: ``Tensor[p]``."""
        return self.evaluator.gradient(self.query, self.theta, self.frozen)

    def example_gradients(self) -> torch.Tensor:
        """``Tensor[n, p]``: the gradient of each query example's loss."""
        return self.evaluator.example_gradients(self.query, self.theta, self.frozen)

    def differences(self, deltas: torch.Tensor, per_example: bool = False, chunk_rows: int = 16) -> torch.Tensor:
        """``f(θ + δ_r) − f(θ)`` for every row of ``deltas: Tensor[k, p]``: ``Tensor[k]`` (``Tensor[k, n]``
        per query example with ``per_example``), the query evaluated at each counterfactual's parameters."""
        ev = self.evaluator
        value = _values(ev.loss, self.query, ev.move, self.frozen, per_example)
        theta = self.theta
        with torch.no_grad():
            factual = value(theta)
            rows = [
                torch.func.vmap(lambda d: value(theta + d))(deltas[i : i + chunk_rows].to(theta))
                for i in range(0, deltas.shape[0], chunk_rows)
            ]
        if not rows:
            return torch.zeros((0, *factual.shape), dtype=deltas.dtype, device=deltas.device)
        out = (torch.cat(rows) - factual).to(deltas.dtype)
        unmoved = ~(deltas != 0).any(dim=1)  # the factual run itself: exactly 0, whatever vmap's rounding
        out[unmoved.to(out.device)] = 0
        return out
