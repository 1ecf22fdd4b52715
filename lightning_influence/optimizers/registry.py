"""The one mapping from an optimizer kind to its model: a live optimizer (:func:`~.state.model_optimizer`) and a
recorded trajectory (its ``meta["optimizer"]``) both resolve their kind here. No Lightning."""

from __future__ import annotations

from typing import Callable

from lightning_influence.optimizers.adam import AdamJacobian, AdamWJacobian
from lightning_influence.optimizers.base import OptimizerJacobian
from lightning_influence.optimizers.sgd import SGDJacobian

OPTIMIZER_KINDS: dict[str, Callable[[bool], OptimizerJacobian]] = {
    "sgd": lambda momentum: SGDJacobian(momentum=momentum),
    "sgd-approx": lambda momentum: SGDJacobian(momentum=False),  # optimizer_model="sgd": the mismatch baseline
    "adam": lambda momentum: AdamJacobian(decoupled=False),
    "adamw": lambda momentum: AdamWJacobian(),
}
"""kind → ``(momentum) -> model``; ``momentum`` says whether SGD keeps a momentum buffer."""


def jacobian_for_kind(kind: str, momentum: bool = False) -> OptimizerJacobian:
    """The model of optimizer ``kind``; ``KeyError`` for a kind no model exists for."""
    return OPTIMIZER_KINDS[kind](momentum)
