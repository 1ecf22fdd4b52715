"""Query functions f(θ) and their gradients at given tracked parameters.

A query is one of
- a batch: f = mean per-sample loss over it (the same ``loss_fn`` as training);
- an iterable of batches (a DataLoader): f = mean per-sample loss over all its samples;
- a callable ``f(module) -> scalar``: anything differentiable (a prediction, a margin, a metric).

Batch and DataLoader queries are evaluated the way Lightning validates: the model in eval mode (dropout off,
running statistics used); a callable decides for itself (it gets the model in whatever mode training left it).
Scores use ⟨∇f(θ), δθ_j⟩, so only ∇f is needed. A query whose values (losses) or gradient hold NaN or inf is
refused where it is evaluated (:class:`~lightning_influence.errors.NonFiniteInfluenceError`, naming the query, the
samples and where): every score on it would be NaN. Nothing here knows Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable, NoReturn

import torch
from torch.func import grad

from lightning_influence.autodiff.functional import FunctionalLoss
from lightning_influence.autodiff.per_sample import map_rows
from lightning_influence.autodiff.running_stats import differentiable_running_stats
from lightning_influence.errors import NonFiniteInfluenceError

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


def nonfinite_values(batch: Any, path: str = "batch") -> list[str]:
    """Where a collated batch holds NaN or inf, e.g. ``["batch[0] (2 of 40 values)"]`` (empty: none), looking into
    nested tuples, lists and dicts; integer tensors cannot."""
    if isinstance(batch, torch.Tensor):
        if not (batch.dtype.is_floating_point or batch.dtype.is_complex) or bool(torch.isfinite(batch).all()):
            return []
        bad = int((~torch.isfinite(batch)).sum())
        return [f"{path} ({bad} of {batch.numel()} values)"]
    if isinstance(batch, Mapping):
        return [where for k, v in batch.items() for where in nonfinite_values(v, f"{path}[{k!r}]")]
    if isinstance(batch, (tuple, list)):
        return [where for i, v in enumerate(batch) for where in nonfinite_values(v, f"{path}[{i}]")]
    return []


_FIX = (
    " Every score on it would be NaN, so nothing is scored or written. Check those samples' inputs and targets for"
    " NaN/inf (torch.isfinite) and the model's output on them (a log of 0, an overflow), and drop or fix them."
)


def _check_losses(label: str, losses: list[torch.Tensor], gradient: torch.Tensor) -> None:
    """Refuse non-finite query values (``losses``: each batch's per-sample losses, in order) or a non-finite
    gradient, with one synchronisation in the common case."""
    values = torch.cat([v.detach().reshape(-1) for v in losses])
    if bool(torch.isfinite(values).all() & torch.isfinite(gradient).all()):
        return
    if not bool(torch.isfinite(values).all()):
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        sizes = [v.numel() for v in losses]
        first, start = 0, 0
        while start + sizes[first] <= bad[0]:
            start, first = start + sizes[first], first + 1
        where = f"samples {bad[:10]}"
        if len(sizes) > 1:
            where += f", counted over its batches; the first in batch {first}"
        raise NonFiniteInfluenceError(
            f"{label}: its loss is NaN or inf on {len(bad)} of its {values.numel()} samples ({where}).{_FIX}"
        )
    _refuse_gradient(label, gradient)


def _refuse_gradient(label: str, gradient: torch.Tensor) -> NoReturn:
    bad = int((~torch.isfinite(gradient)).sum())
    raise NonFiniteInfluenceError(
        f"{label}: its value is finite but its gradient holds NaN or inf ({bad} of {gradient.numel()} entries), so"
        " every score on it would be NaN. An operation whose derivative is infinite at these inputs (sqrt or norm at"
        " 0, a log near 0, an overflow in backward) is the usual cause: guard it (e.g. add a small epsilon)."
    )


def query_gradient(
    loss: FunctionalLoss,
    theta: torch.Tensor,
    query: Query,
    move: MoveFn,
    frozen: dict | None = None,
    label: str = "The query",
) -> torch.Tensor:
    """``∇f(θ)``: ``Tensor[p]`` for the query's mean loss (or the callable's value). Non-finite values or gradients
    raise :class:`NonFiniteInfluenceError` whose message starts with ``label``."""
    if _is_callable_query(query):
        return _callable_gradient(loss, theta, query, frozen, label)

    def summed(t: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        losses = loss.per_sample_losses(t, batch, frozen)
        return losses.sum(), losses

    total, count, kept = torch.zeros_like(theta), 0, []
    for batch in _batches(query):
        with loss.evaluating():
            g, losses = grad(summed, has_aux=True)(theta, move(batch))  # one forward gives both
        total += g
        count += losses.shape[0]
        kept.append(losses)
    if count == 0:
        raise ValueError("The query holds no samples.")
    _check_losses(label, kept, total)
    return total / count


def query_example_gradients(
    loss: FunctionalLoss,
    theta: torch.Tensor,
    query: Query,
    move: MoveFn,
    frozen: dict | None = None,
    label: str = "The query",
) -> torch.Tensor:
    """Per-example gradients ``Tensor[n, p]`` of every sample of a batch / DataLoader query (non-finite ones
    refused, as in :func:`query_gradient`)."""
    if _is_callable_query(query):
        return _callable_gradient(loss, theta, query, frozen, label).unsqueeze(0)
    batches = [move(batch) for batch in _batches(query)]
    with loss.evaluating():
        out = torch.cat([loss.sample_gradients(theta, batch, frozen=frozen) for batch in batches])
    if not bool(torch.isfinite(out).all()):
        with torch.no_grad(), loss.evaluating():  # name the samples whose loss is not finite, if any
            losses = [loss.per_sample_losses(theta, batch, frozen) for batch in batches]
        _check_losses(label, losses, torch.zeros(()))
        bad = (~torch.isfinite(out).all(dim=1)).nonzero().flatten().tolist()
        raise NonFiniteInfluenceError(
            f"{label}: the loss of each sample is finite, but the gradient of {len(bad)} of its {out.shape[0]} samples"
            f" holds NaN or inf (samples {bad[:10]}). An operation whose derivative is infinite at these inputs (sqrt"
            " or norm at 0, a log near 0, an overflow in backward) is the usual cause: guard it (e.g. add a small"
            " epsilon)."
        )
    return out


def running_stats_gradient(
    loss: FunctionalLoss,
    theta: torch.Tensor,
    query: Query,
    move: MoveFn,
    frozen: dict | None = None,
    per_example: bool = False,
) -> torch.Tensor | None:
    """``∇_r f``: the query's gradient with respect to the running buffers the training forward moves (BatchNorm's
    running statistics, which an eval-mode query reads), ``Tensor[q]`` (``Tensor[n, q]`` per example); None when
    the model moves none. The buffers' values come from ``frozen``, else from the module."""
    stats = loss.running_stats
    if stats is None:
        return None
    buffers = stats.read(loss.module, frozen).to(theta)

    def value(flat: torch.Tensor) -> torch.Tensor:
        return _values(loss, query, move, stats.with_values(frozen, flat), per_example)(theta)

    with torch.enable_grad(), differentiable_running_stats(loss.module):
        return (torch.func.jacrev if per_example else grad)(value)(buffers).detach()


def _is_callable_query(query: Query) -> bool:
    return callable(query) and not is_batch(query) and not isinstance(query, Iterable)


def _callable_gradient(
    loss: FunctionalLoss, theta: torch.Tensor, fn: Callable, frozen: dict | None, label: str = "The query"
) -> torch.Tensor:
    g, value = torch.func.grad_and_value(lambda t: _callable_value(loss, t, fn, frozen))(theta)
    if not bool(torch.isfinite(value)):
        _refuse_callable_value(label, value)
    if not bool(torch.isfinite(g).all()):
        _refuse_gradient(label, g)
    return g


def _refuse_callable_value(label: str, value: torch.Tensor) -> NoReturn:
    raise NonFiniteInfluenceError(
        f"{label}: the callable returned {float(value)}. Every score on it would be NaN, so nothing is scored or"
        " written. Make it return a finite scalar at these parameters."
    )


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

    def label(self, query: Query, where: str = "") -> str:
        """How an error names ``query``: ``Registered query 'val'`` or ``The query``, then ``where`` if given."""
        name = f"Registered query {query!r}" if isinstance(query, str) and query in self.registered else "The query"
        return f"{name} {where}" if where else name

    def gradient(self, query: Query, theta: torch.Tensor, frozen: dict | None = None, where: str = "") -> torch.Tensor:
        """``∇f(θ)``: ``Tensor[p]`` (``where``: at which parameters, for an error's message)."""
        with torch.enable_grad():
            label = self.label(query, where)
            return query_gradient(self.loss, theta, self.resolve(query), self.move, frozen, label)

    def example_gradients(
        self, query: Query, theta: torch.Tensor, frozen: dict | None = None, where: str = ""
    ) -> torch.Tensor:
        """Per-example gradients ``Tensor[n, p]``."""
        with torch.enable_grad():
            label = self.label(query, where)
            return query_example_gradients(self.loss, theta, self.resolve(query), self.move, frozen, label)

    def probe(self, query: Query, theta: torch.Tensor, frozen: dict | None = None, where: str = "") -> QueryProbe:
        """``query`` (a registered name, or any query) at the parameters ``theta`` (``where`` says which, for an
        error's message: e.g. ``"at the window ending at step 12"``)."""
        return QueryProbe(self, query, theta, frozen, where)


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

    def __init__(
        self, evaluator: QueryEvaluator, query: Query, theta: torch.Tensor, frozen: dict | None, where: str = ""
    ) -> None:
        self.evaluator, self.query, self.theta, self.frozen = evaluator, evaluator.resolve(query), theta, frozen
        self.label = evaluator.label(query, where)
        """How an error names this query and these parameters."""

    def gradient(self) -> torch.Tensor:
        """``∇f(θ)``: ``Tensor[p]``."""
        ev = self.evaluator
        with torch.enable_grad():
            return query_gradient(ev.loss, self.theta, self.query, ev.move, self.frozen, self.label)

    def example_gradients(self) -> torch.Tensor:
        """``Tensor[n, p]``: the gradient of each query example's loss."""
        ev = self.evaluator
        with torch.enable_grad():
            return query_example_gradients(ev.loss, self.theta, self.query, ev.move, self.frozen, self.label)

    def running_stats_gradient(self, per_example: bool = False) -> torch.Tensor | None:
        """``∇_r f``: ``Tensor[q]`` (``Tensor[n, q]`` per example) for the running buffers the training forward
        moves, None when it moves none (:func:`running_stats_gradient`)."""
        ev = self.evaluator
        return running_stats_gradient(ev.loss, self.theta, self.query, ev.move, self.frozen, per_example)

    def differences(
        self,
        deltas: torch.Tensor,
        per_example: bool = False,
        chunk_rows: int = 16,
        buffer_deltas: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``f(θ + δ_r, b + δb_r) − f(θ, b)`` for every row of ``deltas: Tensor[k, p]`` (and of ``buffer_deltas:
        Tensor[k, q]``, the running buffers' shifts, when the model moves buffers): ``Tensor[k]`` (``Tensor[k, n]``
        per query example with ``per_example``), the query evaluated at each counterfactual's parameters."""
        ev, theta = self.evaluator, self.theta
        stats = ev.loss.running_stats if buffer_deltas is not None else None
        buffers = None if stats is None else stats.read(ev.loss.module, self.frozen).to(theta)

        def value(d: torch.Tensor, db: torch.Tensor | None) -> torch.Tensor:
            if stats is None or buffers is None or db is None:
                return _values(ev.loss, self.query, ev.move, self.frozen, per_example)(theta + d)
            frozen = stats.with_values(self.frozen, buffers + db)
            return _values(ev.loss, self.query, ev.move, frozen, per_example)(theta + d)

        with torch.no_grad():
            factual = value(torch.zeros_like(theta), None)
            if not bool(torch.isfinite(factual).all()):
                self._refuse_values(factual)
            rows = []
            for i in range(0, deltas.shape[0], chunk_rows):
                shift = deltas[i : i + chunk_rows].to(theta)
                if stats is None or buffer_deltas is None:
                    rows.append(map_rows(lambda d: value(d, None), shift))
                else:
                    rows.append(map_rows(value, shift, buffer_deltas[i : i + chunk_rows].to(theta)))
        if not rows:
            return torch.zeros((0, *factual.shape), dtype=deltas.dtype, device=deltas.device)
        out = (torch.cat(rows) - factual).to(deltas.dtype)
        unmoved = ~(deltas != 0).any(dim=1)  # the factual run itself: exactly 0, whatever vmap's rounding
        if buffer_deltas is not None:
            unmoved &= ~(buffer_deltas != 0).any(dim=1).to(unmoved.device)
        out[unmoved.to(out.device)] = 0
        return out

    def _refuse_values(self, factual: torch.Tensor) -> None:
        """The query's value at θ is not finite: name its samples (or the callable's value)."""
        if _is_callable_query(self.query):
            _refuse_callable_value(self.label, factual)
        ev = self.evaluator
        with torch.no_grad(), ev.loss.evaluating():
            losses = [ev.loss.per_sample_losses(self.theta, ev.move(b), self.frozen) for b in _batches(self.query)]
        _check_losses(self.label, losses, torch.zeros(()))
        raise NonFiniteInfluenceError(f"{self.label}: its value is {factual.tolist()}.{_FIX}")
