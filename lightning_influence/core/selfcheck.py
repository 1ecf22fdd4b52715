"""The self-check of the first optimizer steps: does the tracker's model reproduce the real step?

Two comparisons, on the first ``self_check_steps`` steps of a fit:

- the gradient of the mean of ``loss_fn``'s per-sample losses (plus the regulariser), as the tracker
  differentiates it, against the gradient the optimizer received;
- the optimizer model's post-step parameters (from θ_t, the gradient and the pre-step optimizer
  state) against the parameters the optimizer really produced; and, at the next step, that nothing
  moved the parameters in between.

Any mismatch raises :class:`~lightning_influence.errors.SelfCheckError` naming the step and the usual
causes. Nothing here knows Lightning.
"""

from __future__ import annotations

import torch

from lightning_influence.errors import NonFiniteInfluenceError, SelfCheckError
from lightning_influence.optimizers import OptimizerSpec
from lightning_influence.records import StepRecord

# Relative gradient mismatch accepted under mixed precision: the step's gradient is computed in
# bf16/fp16 while the tracker differentiates the loss in the parameters' float32.
MIXED_GRAD_TOLERANCE = 5e-2


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float64 else 1e-3


class StepSelfCheck:
    """Checks the first ``steps`` booked steps of one fit (0 disables it).

    Args:
        steps: how many first steps to check.
        spec: the optimizer model in use.
        mixed_precision: the step's gradient was computed under autocast (looser gradient tolerance).
    """

    def __init__(self, steps: int, spec: OptimizerSpec, mixed_precision: bool) -> None:
        self.steps = steps
        self.spec = spec
        self.mixed_precision = mixed_precision

    def wants(self, steps_booked: int) -> bool:
        """Whether the next step (after ``steps_booked`` booked ones) is checked."""
        return steps_booked < self.steps

    def check_gradient(self, record: StepRecord, recomputed: torch.Tensor) -> None:
        """The tracker's step gradient must reproduce the one the optimizer received."""
        raw = record.raw_grad
        tol = MIXED_GRAD_TOLERANCE if self.mixed_precision else _tolerance(record.theta.dtype)
        err = float((recomputed - raw).norm() / raw.norm().clamp_min(torch.finfo(raw.dtype).tiny))
        if err > tol:
            raise SelfCheckError(
                f"At optimizer step {record.step}, the mean of loss_fn's per-sample losses does not reproduce the"
                f" gradient the optimizer received (relative difference {err:.2e} > {tol:g}). Usual causes: a"
                " regulariser or auxiliary loss in training_step that loss_fn lacks (pass regularizer=), a loss"
                " that is not the mean of per-sample losses (reduction='sum', extra scaling), or random layers."
            )

    def check_update(self, record: StepRecord, observed: torch.Tensor) -> None:
        """The optimizer model's post-step θ must reproduce ``observed`` (``Tensor[p]``)."""
        if self.spec.kind == "sgd-approx" or record.pre_state is None:  # pre_state: read on checked steps
            return  # plain SGD stands in for the real optimizer by choice: the update is not expected to match
        theta = record.theta
        predicted = self.spec.jacobian.predict(record.optimizer, record.pre_state)
        update = float((observed - theta).abs().max())
        eps = torch.finfo(theta.dtype).eps
        err = float((predicted - observed).abs().max())
        if err > _tolerance(theta.dtype) * update + 16 * eps * float(theta.abs().max()):
            raise SelfCheckError(
                f"At optimizer step {record.step}, the tracker's model of {self.spec.kind} does not reproduce the"
                f" observed parameter update (max abs difference {err:.2e}, update size {update:.2e}). Usual causes:"
                " gradient clipping or gradient changes in a hook, an optimizer option the tracker does not model,"
                " or parameters changed outside the optimizer."
            )


# What moves parameters outside the optimizer, in the words of the error messages
_CULPRITS = (
    "a weight-averaging callback (StochasticWeightAveraging, EMAWeightAveraging / WeightAveraging) swapping in"
    " averaged weights, a projection or weight clipping in a hook, a fine-tuning callback changing which"
    " parameters train, or weights loaded by hand"
)


class ParameterWatch:
    """θ at the start of every optimizer step, and at the end of fit, must be what the previous step left:
    anything that moves the tracked parameters outside the optimizer stops the run (one comparison of the
    flat ``Tensor[p]`` per step), since the states model only the optimizer's updates."""

    def __init__(self) -> None:
        self._expected: torch.Tensor | None = None
        self._after_step: int | None = None

    def expect(self, steps_after: int, theta: torch.Tensor) -> None:
        """The parameters after the step that brought the count to ``steps_after``."""
        self._expected, self._after_step = theta, steps_after

    def check(self, theta: torch.Tensor, where: str) -> None:
        """``where``: e.g. "before optimizer step 7" or "at the end of fit". Parameters that the last step left NaN
        or inf (never equal to themselves) raise :class:`~lightning_influence.errors.NonFiniteInfluenceError`
        naming that step: the steps that pass pay nothing for it."""
        expected, self._expected = self._expected, None
        if expected is None or torch.equal(theta, expected):
            return
        assert self._after_step is not None  # set by expect() together with the expected parameters
        if not bool(torch.isfinite(expected).all()):
            raise NonFiniteInfluenceError(_non_finite_message(expected, self._after_step - 1))
        moved = float((theta - expected).abs().max())
        raise SelfCheckError(
            f"The tracked parameters changed outside the optimizer between the end of optimizer step"
            f" {self._after_step - 1} and {where} (max abs change {moved:.2e}). Usual causes: {_CULPRITS}. The"
            " tracker models only the optimizer's updates: remove that change while tracking (or track the run"
            " that produces the weights you evaluate)."
        )


def _non_finite_message(theta: torch.Tensor, step: int) -> str:
    """The tracked parameters ``theta`` hold NaN or inf after optimizer step ``step``."""
    bad = int((~torch.isfinite(theta)).sum())
    return (
        f"The tracked parameters are not finite after optimizer step {step} ({bad} of {theta.numel()} values are NaN"
        f" or inf): the training loss or its gradient was not finite at step {step}, or the update overflowed (a"
        " float16 model: Adam's eps and squared gradients underflow in float16). Training diverged, and nothing"
        " after it can be tracked or recorded. Fix the loss (log(0), division by zero, NaN in the data), lower the"
        " learning rate or clip gradients, and train float16 models with precision='16-mixed' on float32 weights"
        " instead of model.half()."
    )
