"""The ``"tracin"`` baseline: no propagation and no optimizer model ([concepts.md: One step]).

For every registered query q it accumulates, over the steps in which tracked sample j takes part,

    Σ_t Σ_{m ∋ j} (η_t w_m / |B_m|) ⟨∇q(θ_t), g_j(θ_t)⟩

with η_t the learning rate of each coordinate at that step. It exists so that users and the
benchmarks can see what propagation buys.

**Per query example.** TracIn can only answer what it accumulated during training, so per-example scores must be
asked for before fit: a query registered as ``queries={"val": PerExampleQuery(batch_or_loader)}`` keeps the running
sums ``Tensor[k, n]`` of each of its n examples i, Σ_t Σ_{m ∋ j} (η_t w_m / |B_m|) ⟨∇ℓ_i(θ_t), g_j(θ_t)⟩, from one
batched gradient ``Tensor[b, p]`` of the query's examples per query batch and step (no registered query per example).
Their mean over i is the query's score (f is the mean loss over its n examples), so the query needs no other
gradient. Cost per step: the per-example gradients of the query (``Tensor[b, p]``, one query batch at a time) instead
of one gradient of its mean loss, and the products ``[M, p] @ [p, b]`` (M: the step's tracked rows, whose scaled
gradients are then held together, all micro-batches of the step); memory: k × n running sums. Nothing here knows
Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Sequence

import torch
from torch.utils.data import RandomSampler

from lightning_influence.autodiff.functional import FunctionalLoss
from lightning_influence.autodiff.queries import (
    QueryEvaluator,
    is_batch,
    nonfinite_values,
    query_example_gradients,
)
from lightning_influence.errors import NonFiniteInfluenceError
from lightning_influence.estimators.base import Estimator, QueryProbe, Reduce
from lightning_influence.records import MicroBatch, StepRecord

"""``(θ_t: Tensor[p], frozen) -> {name: ∇q(θ_t): Tensor[p]}`` for the registered queries."""

_AT_STEP = "at the parameters of a training step"


class PerExampleQuery:
    """A batch or a DataLoader query whose ``"tracin"`` scores are also kept per query example.

    Register it as any query, ``InfluenceTracker(estimator="tracin", queries={"val": PerExampleQuery(val_batch)})``,
    then ask ``tracker.influence("val", per_example=True)`` after fit (``per_example: Tensor[k, n]``, one column per
    query example, in the query's order). For every other estimator it is the query it wraps (an iterable of its
    batches, like a DataLoader). A DataLoader must give the same examples in the same order at every step: one that
    shuffles is refused.

    Args:
        query: a collated batch or a DataLoader (any iterable of batches); not a callable (it has one example).

    Raises:
        TypeError: a callable or anything else that is not a batch or an iterable of batches.
        ValueError: a DataLoader whose sampler shuffles.
        NonFiniteInfluenceError: a batch that holds NaN or inf.
    """

    query: Any
    """The wrapped batch or DataLoader."""

    def __init__(self, query: Any) -> None:
        if isinstance(query, PerExampleQuery):
            query = query.query
        if is_batch(query):
            found = nonfinite_values(query, "PerExampleQuery(batch)")
            if found:
                raise NonFiniteInfluenceError(
                    f"The query batch holds NaN or inf: {', '.join(found)}. Every score on it would be NaN. Drop or"
                    " fix those samples before registering it (torch.isfinite(x) finds them)."
                )
        elif not isinstance(query, Iterable) or isinstance(query, (str, bytes)):
            raise TypeError(
                "PerExampleQuery needs a batch or a DataLoader (an iterable of batches): per-example scores are the"
                f" scores on each of its examples; got {type(query).__name__} (a callable query has one example)."
            )
        elif isinstance(getattr(query, "sampler", None), RandomSampler):
            raise ValueError(
                "PerExampleQuery needs a DataLoader that gives the same examples in the same order at every step"
                " (column i of the per-example scores is example i): pass shuffle=False."
            )
        self.query = query

    def __iter__(self) -> Iterator[Any]:
        return iter([self.query]) if is_batch(self.query) else iter(self.query)

    def __repr__(self) -> str:
        return f"PerExampleQuery({type(self.query).__name__})"


class TracInAccumulator(Estimator):
    """Running TracIn scores ``Tensor[k]`` per registered query (``Tensor[k, n]`` per example for the queries
    registered as :class:`PerExampleQuery`).

    Args:
        loss: the functional per-sample loss.
        num_tracked: k.
        queries: the registered queries; those registered as :class:`PerExampleQuery` keep their scores per example.
        dtype, device: of the running scores.
    """

    name = "tracin"

    def __init__(
        self,
        loss: FunctionalLoss,
        num_tracked: int,
        queries: QueryEvaluator,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.loss = loss
        self.num_tracked = num_tracked
        self.queries = queries
        self.scores: dict[str, torch.Tensor] = {}
        self.example_scores: dict[str, torch.Tensor] = {}
        """``{name: Tensor[k, n]}``: the per-example running sums (after the first step)."""
        self._dtype, self._device = dtype, device
        self.example_queries = {name: q for name, q in queries.registered.items() if isinstance(q, PerExampleQuery)}
        self._incomplete: set[str] = set()  # per-example sums missing from a restored checkpoint

    # ------------------------------------------------------------------ booking
    def book(self, record: StepRecord, parts: Sequence[MicroBatch], reduce: Reduce | None = None) -> None:
        theta_t = record.theta
        grads = self._mean_gradients(theta_t, record.frozen)
        increments = {name: torch.zeros(self.num_tracked, dtype=self._dtype, device=self._device) for name in grads}
        lr = record.optimizer.lr_vector()
        rows, scaled = [], []  # kept only for the per-example queries: the step's tracked rows, Tensor[M, p]
        for part in parts:
            if not part.state_rows.numel():
                continue
            batch_rows, state_rows = part.batch_rows.to(theta_t.device), part.state_rows.to(self._device)
            g = self.loss.sample_gradients(theta_t, part.batch, batch_rows, part.batch_size, record.frozen)
            g = g * (lr * (part.weight / part.batch_size))  # [m, p]
            for name, q in grads.items():
                increments[name].index_add_(0, state_rows, (g @ q).to(self._dtype))
            if self.example_queries:
                rows.append(state_rows)
                scaled.append(g)
        for name, inc in increments.items():
            self.scores[name] = self.running(name) + (inc if reduce is None else reduce(inc))
        for name, query in self.example_queries.items():
            self._book_examples(name, query, theta_t, record.frozen, rows, scaled, reduce)
        return None

    def _mean_gradients(self, theta: torch.Tensor, frozen: dict) -> dict[str, torch.Tensor]:
        """``∇q(θ_t)`` of the queries not kept per example (those are the mean of their examples' scores)."""
        names = [name for name in self.queries.registered if name not in self.example_queries]
        return {name: self.queries.gradient(name, theta, frozen, _AT_STEP) for name in names}

    def _book_examples(
        self,
        name: str,
        query: Any,
        theta: torch.Tensor,
        frozen: dict,
        rows: list[torch.Tensor],
        scaled: list[torch.Tensor],
        reduce: Reduce | None,
    ) -> None:
        """Add this step's ``Tensor[k, n]`` of ``name``: one batched gradient per query batch, ``[m, p] @ [p, b]``."""
        columns = []
        for index, batch in enumerate(query):
            label = f"Registered query {name!r} (its batch {index}) {_AT_STEP}"
            with torch.enable_grad():
                q = query_example_gradients(self.loss, theta, batch, self.queries.move, frozen, label)  # [b, p]
            inc = torch.zeros(self.num_tracked, q.shape[0], dtype=self._dtype, device=self._device)
            for r, s in zip(rows, scaled):
                inc.index_add_(0, r, (s @ q.T).to(self._dtype))
            columns.append(inc)
        if not columns or sum(c.shape[1] for c in columns) == 0:
            raise ValueError(f"Registered query {name!r} holds no samples.")
        inc = torch.cat(columns, dim=1)
        inc = inc if reduce is None else reduce(inc)
        held = self.example_scores.get(name)
        if held is not None and held.shape != inc.shape:
            raise ValueError(
                f"Registered query {name!r} gave {inc.shape[1]} examples at this step and {held.shape[1]} before: a"
                " PerExampleQuery must give the same examples in the same order at every step (shuffle=False, no"
                " random drop_last)."
            )
        self.example_scores[name] = inc if held is None else held + inc
        self.scores[name] = self.example_scores[name].mean(dim=1)

    # ------------------------------------------------------------------ answers
    def running(self, query: str) -> torch.Tensor:
        """The scores accumulated so far on ``query``: ``Tensor[k]`` (zeros before any step)."""
        return self.scores.get(query, torch.zeros(self.num_tracked, dtype=self._dtype, device=self._device))

    def running_examples(self, query: str) -> torch.Tensor:
        """The per-example scores accumulated so far on registered query ``query``: ``Tensor[k, n]``, whose mean over
        the n examples is :meth:`running` (``Tensor[k, 0]`` before any step).

        Raises:
            ValueError: ``query`` was not registered as a :class:`PerExampleQuery` (TracIn cannot go back to the
                steps it has booked), or a restored checkpoint did not hold its per-example sums.
        """
        if query not in self.example_queries:
            raise ValueError(
                f"per_example=True is not available with estimator='tracin' for query {query!r}: TracIn accumulates"
                " the query's gradients during training and kept only its mean. Register it before fit as"
                f" queries={{{query!r}: PerExampleQuery(batch_or_loader)}}"
                " (from lightning_influence.estimators.tracin import PerExampleQuery) to keep a score per query"
                " example, or use estimator='acc', which answers per_example=True on any query."
            )
        if query in self._incomplete:
            raise ValueError(
                f"The per-example TracIn scores of {query!r} are incomplete: the checkpoint this fit resumed from did"
                " not hold them (it kept only the mean). Train again from the start to have them."
            )
        held = self.example_scores.get(query)
        return held if held is not None else torch.zeros(self.num_tracked, 0, dtype=self._dtype, device=self._device)

    def answer_registered(self, query: Any, per_example: bool = False) -> torch.Tensor:
        """The scores of registered query ``query`` (its name): ``Tensor[k]``, or ``Tensor[k, n]`` per example (see
        :meth:`running_examples`). ``ValueError`` for anything but a registered name."""
        if not isinstance(query, str):
            raise ValueError(
                f"estimator={self.name!r} only answers registered queries: per_example=True needs the name of a query"
                " registered before fit as queries={'name': PerExampleQuery(batch_or_loader)} (from"
                " lightning_influence.estimators.tracin import PerExampleQuery); use estimator='acc' for per-example"
                " answers on any query."
            )
        return self.running_examples(query) if per_example else self.running(query)

    def totals(self, query: str, probe: QueryProbe) -> torch.Tensor:
        return self.running(query)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"tracin_scores": {n: s.detach().cpu().clone() for n, s in self.scores.items()}}
        if self.example_scores:
            state["tracin_example_scores"] = {n: s.detach().cpu().clone() for n, s in self.example_scores.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = {n: s.to(self._device, self._dtype) for n, s in state["tracin_scores"].items()}
        examples = state.get("tracin_example_scores", {})
        self.example_scores = {n: s.to(self._device, self._dtype) for n, s in examples.items()}
        self._incomplete = {n for n in self.example_queries if n in self.scores and n not in self.example_scores}
