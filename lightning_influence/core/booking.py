"""The step consumers of one fit that wrap its parts: the estimator, the self-check, the states' finite check.

A fit hands every booked step (:class:`~lightning_influence.records.BookedStep`) to its consumers in list order:
:class:`EstimatorBooking`, :class:`SelfCheckBooking`, :class:`FiniteStatesCheck`, then the audit and the trajectory
recorder, which consume steps themselves. Nothing here knows Lightning.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from lightning_influence.core.selfcheck import StepSelfCheck
from lightning_influence.core.state import BookingClock
from lightning_influence.errors import explain_torch_func_error
from lightning_influence.estimators.base import Estimator
from lightning_influence.records import BookedStep, StepRecord


class EstimatorBooking:
    """Advances the main estimator over each booked step and times it on ``clock``.

    ``gradient``: the step gradient ``Tensor[p]`` the estimator recomputed for the last step (None when it does
    not compute one), which the self-check compares with the optimizer's.
    """

    def __init__(self, estimator: Estimator, clock: BookingClock) -> None:
        self.estimator, self.clock = estimator, clock
        self.gradient: tuple[int, torch.Tensor] | None = None  # (step, gradient)

    def book(self, step: BookedStep) -> None:
        started = time.perf_counter()
        try:
            with torch.enable_grad():
                gradient = self.estimator.book(step.record, step.tracked, step.reduce)
        except RuntimeError as err:
            explained = explain_torch_func_error(err)
            if explained is None:
                raise
            raise explained from err
        self.clock.add(time.perf_counter() - started)
        self.gradient = None if gradient is None else (step.record.step, gradient)


class SelfCheckBooking:
    """On a fit's first steps: the step gradient and the optimizer model's update must reproduce the real ones.

    ``estimated``: the estimator's booking, whose recomputed gradient is checked when it made one;
    ``recompute``: the step gradient from the record otherwise.
    """

    def __init__(
        self,
        check: StepSelfCheck,
        estimated: EstimatorBooking,
        recompute: Callable[[StepRecord], torch.Tensor],
    ) -> None:
        self.check, self.estimated, self.recompute = check, estimated, recompute

    def book(self, step: BookedStep) -> None:
        if not self.check.wants(step.index):
            return
        record, known = step.record, self.estimated.gradient
        gradient = known[1] if known is not None and known[0] == record.step else self.recompute(record)
        self.check.check_gradient(record, gradient)
        self.check.check_update(record, step.after)


class FiniteStatesCheck:
    """Raises :class:`~lightning_influence.errors.NonFiniteInfluenceError` as soon as a state holds NaN or inf,
    naming the step and the samples."""

    def __init__(self, estimator: Estimator, sample_ids: torch.Tensor) -> None:
        self.estimator, self.sample_ids = estimator, sample_ids

    def book(self, step: BookedStep) -> None:
        self.estimator.check_finite(step.record.step, self.sample_ids)
