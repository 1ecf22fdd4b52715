"""The estimators by name, each with what it can do: the one place that knows ``"acc"`` from ``"tracin"``.

Code elsewhere asks a capability (``spec.keeps_states``, ``spec.per_example``...) instead of comparing names, so a
new estimator is one entry here. Sign of every score: f(θ_-j) − f(θ), negative = harmful. No Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from lightning_influence.autodiff.functional import FunctionalLoss
from lightning_influence.autodiff.hvp_plan import HvpChoice
from lightning_influence.autodiff.queries import QueryEvaluator
from lightning_influence.estimators.base import Estimator
from lightning_influence.estimators.engine import InfluenceEngine
from lightning_influence.estimators.exact import ExactEngine
from lightning_influence.estimators.tracin import TracInAccumulator
from lightning_influence.optimizers import OptimizerJacobian
from lightning_influence.records import Agree

EstimatorName = Literal["acc", "first-order", "exact", "tracin"]


@dataclass(frozen=True)
class EstimatorInputs:
    """What building an estimator may use: the loss, the optimizer model, k tracked rows, the HVP plan."""

    loss: FunctionalLoss
    jacobian: OptimizerJacobian
    num_tracked: int
    chunk_rows: int
    dtype: torch.dtype
    device: torch.device
    queries: QueryEvaluator
    hvp_choice: HvpChoice | None = None
    tune_hvp: bool = True  # False when the user fixed the HVP chunk size
    agree: Agree | None = None  # rank zero's choice on every data-parallel process (None: one process)


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator's capabilities and its constructor.

    Attributes:
        keeps_states: per-sample forward states (δθ, and the optimizer's blocks) are propagated.
        any_query: answers any query after fit, not only the queries registered before it.
        per_example: answers per query example (``per_example=True``).
        source_hvps: its per-sample terms include the sample's own HVP (the leave-k-out transition, c = 1).
        batched_hvp: one batched HVP over the states per step, whose method is measured at fit start.
        exact: the counterfactual itself; an audit next to it has nothing to compare.
    """

    name: str
    keeps_states: bool
    any_query: bool
    per_example: bool
    source_hvps: bool
    batched_hvp: bool
    exact: bool
    build: Callable[[EstimatorInputs], Estimator]
    summary: str


def _engine(name: str) -> Callable[[EstimatorInputs], Estimator]:
    def build(i: EstimatorInputs) -> Estimator:
        return InfluenceEngine(
            i.loss, i.jacobian, i.num_tracked, name, i.chunk_rows, i.dtype, i.device,
            hvp_choice=i.hvp_choice, tune_hvp=i.tune_hvp, agree=i.agree,
        )  # fmt: skip

    return build


ESTIMATORS: dict[str, EstimatorSpec] = {
    spec.name: spec
    for spec in (
        EstimatorSpec(
            "acc", True, True, True, True, True, False, _engine("acc"),
            "leave-k-out transition and the optimizer's exact map",
        ),
        EstimatorSpec(
            "first-order", True, True, True, False, True, False, _engine("first-order"),
            "the fully linear SGD-influence / AdamW-influence recursion",
        ),
        EstimatorSpec(
            "exact", True, True, True, False, False, True,
            lambda i: ExactEngine(i.loss, i.jacobian, i.num_tracked, i.chunk_rows, i.dtype, i.device),
            "the counterfactual run itself: true gradient differences, queries at θ + δθ_j",
        ),
        EstimatorSpec(
            "tracin", False, False, False, False, False, False,
            lambda i: TracInAccumulator(i.loss, i.num_tracked, i.queries, i.dtype, i.device),
            "no propagation: running sums on the registered queries",
        ),
    )
}  # fmt: skip
"""Every estimator by name."""


def estimator_spec(name: str) -> EstimatorSpec:
    """The estimator called ``name``; ``ValueError`` listing the names otherwise."""
    if name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {name!r}.")
    return ESTIMATORS[name]
