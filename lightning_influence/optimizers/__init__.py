"""Optimizer models: how one step of SGD, Adam / AdamW (AMSGrad too), RMSprop, Adagrad, Adamax, NAdam or RAdam moves
a perturbation of its state.

Each model advances stacked per-sample perturbations of the optimizer state (``δθ``, ``δbuf``,
``δm``, ``δv``; each ``Tensor[c, p]``, one row per tracked sample) given the perturbation of the
gradient the optimizer received ``δg: Tensor[c, p]``, written exactly as PyTorch implements the step
([concepts.md: One step]); transposes the linear part of that map for the adjoint sweep ([concepts.md: Every sample at
once]); and replays the factual step (``apply``).

``exact=False`` is the fully linear recursion (SGD-influence / AdamW-influence, estimator
``"first-order"``); ``exact=True`` applies the optimizer's own elementwise map to the
counterfactual moments (estimator ``"acc"``). For SGD and momentum the map is linear, so both agree. The
running maxima (AMSGrad's v̄, Adamax's u) follow the branch that won, ties going to the new value.

Nothing here knows Lightning: a step is described by plain :class:`GroupStep` records, and a live
optimizer is read by :func:`read_step_groups` and :func:`flat_optimizer_state`.
"""

from lightning_influence.errors import UnsupportedOptimizerError
from lightning_influence.optimizers.adagrad import AdagradJacobian
from lightning_influence.optimizers.adam import AdamJacobian, AdamWJacobian
from lightning_influence.optimizers.adamax import AdamaxJacobian
from lightning_influence.optimizers.amsgrad import AMSGradJacobian
from lightning_influence.optimizers.base import GroupStep, OptimizerJacobian, OptimizerStep
from lightning_influence.optimizers.nadam import NAdamJacobian
from lightning_influence.optimizers.radam import RAdamJacobian
from lightning_influence.optimizers.rmsprop import RMSpropJacobian
from lightning_influence.optimizers.sgd import SGDJacobian
from lightning_influence.optimizers.state import (
    STATE_KEYS,
    OptimizerSpec,
    flat_optimizer_state,
    model_optimizer,
    read_group_step,
    read_step_groups,
)

__all__ = [
    "STATE_KEYS",
    "AMSGradJacobian",
    "AdagradJacobian",
    "AdamJacobian",
    "AdamWJacobian",
    "AdamaxJacobian",
    "GroupStep",
    "NAdamJacobian",
    "OptimizerJacobian",
    "OptimizerSpec",
    "OptimizerStep",
    "RAdamJacobian",
    "RMSpropJacobian",
    "SGDJacobian",
    "UnsupportedOptimizerError",
    "flat_optimizer_state",
    "model_optimizer",
    "read_group_step",
    "read_step_groups",
]
