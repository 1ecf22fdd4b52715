"""The one mapping from an optimizer kind to its model: a live optimizer (:func:`~.state.model_optimizer`) and a
recorded trajectory (its ``meta["optimizer"]``) both resolve their kind here. No Lightning."""

from __future__ import annotations

from typing import Callable

from lightning_influence.optimizers.adagrad import AdagradJacobian
from lightning_influence.optimizers.adam import AdamJacobian, AdamWJacobian
from lightning_influence.optimizers.adamax import AdamaxJacobian
from lightning_influence.optimizers.amsgrad import AMSGradJacobian
from lightning_influence.optimizers.base import OptimizerJacobian
from lightning_influence.optimizers.nadam import NAdamJacobian
from lightning_influence.optimizers.radam import RAdamJacobian
from lightning_influence.optimizers.rmsprop import RMSpropJacobian
from lightning_influence.optimizers.sgd import SGDJacobian

OPTIMIZER_KINDS: dict[str, Callable[[bool], OptimizerJacobian]] = {
    "sgd": lambda momentum: SGDJacobian(momentum=momentum),
    "sgd-approx": lambda momentum: SGDJacobian(momentum=False),  # optimizer_model="sgd": the mismatch baseline
    "adam": lambda momentum: AdamJacobian(decoupled=False),
    "adamw": lambda momentum: AdamWJacobian(),
    "adam-amsgrad": lambda momentum: AMSGradJacobian(decoupled=False),
    "adamw-amsgrad": lambda momentum: AMSGradJacobian(decoupled=True),
    "rmsprop": lambda momentum: RMSpropJacobian(momentum=momentum, centered=False),
    "rmsprop-centered": lambda momentum: RMSpropJacobian(momentum=momentum, centered=True),
    "adagrad": lambda momentum: AdagradJacobian(),
    "adamax": lambda momentum: AdamaxJacobian(),
    "nadam": lambda momentum: NAdamJacobian(),
    "radam": lambda momentum: RAdamJacobian(),
}
"""kind → ``(momentum) -> model``; ``momentum`` says whether SGD / RMSprop keep a momentum buffer. A variant that
changes the model's state blocks is its own kind (``"rmsprop-centered"``, ``"adam-amsgrad"``), so that the kind
and the ``momentum`` flag that a recorded trajectory's ``meta["optimizer"]`` holds rebuild the model (older
trajectories name only ``"sgd"``, ``"adam"``, ``"adamw"``)."""

REPLAYABLE_KINDS = tuple(k for k in OPTIMIZER_KINDS if k != "sgd-approx")
"""The kinds a recorded trajectory can name: every exact model (the SGD approximation is never recorded)."""


def jacobian_for_kind(kind: str, momentum: bool = False) -> OptimizerJacobian:
    """The model of optimizer ``kind``; ``KeyError`` for a kind no model exists for."""
    return OPTIMIZER_KINDS[kind](momentum)
