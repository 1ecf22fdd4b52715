"""What the optimizer consumed at one real step: the record that flows from Lightning to the consumers.

The callback builds one :class:`StepRecord` per optimizer step from what it sees in Lightning's hooks:
the micro-batches with their sample ids and weights, θ_t and the gradient just before the step, the
per-group hyper-parameters after schedulers, the clip and the scaler's verdict. It is frozen: what is read
before the step is completed, once the optimizer has stepped, into a new record with the micro-batches and the
post-step state (``dataclasses.replace``), and no consumer ever sees an incomplete one. The fit hands it, as a
:class:`BookedStep`, to its step consumers (:class:`StepConsumer`: the estimator, the self-check, the audit, the
trajectory recorder), which know nothing of Lightning. Nothing here knows Lightning either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from lightning_influence.optimizers import OptimizerStep
from lightning_influence.optimizers.clipping import GradientClip


@dataclass(frozen=True)
class MicroBatchRecord:
    """One micro-batch of a step as this process trained on it.

    ``batch`` is the collated batch given to ``training_step``; ``sample_ids: LongTensor[B]`` (CPU)
    the training-set index of each row; ``weight`` = w_m, the factor of its mean loss in the step loss
    (1/N under gradient accumulation of N, divided again by the world size under DDP).
    """

    batch: Any
    sample_ids: torch.Tensor
    weight: float

    @property
    def batch_size(self) -> int:
        """|B_m|, the denominator of the micro-batch's mean loss."""
        return self.sample_ids.numel()


@dataclass
class MicroBatch:
    """The tracked rows of one micro-batch, as the forward estimators consume them.

    ``state_rows`` / ``batch_rows`` (``LongTensor[m]``): tracked sample ``state_rows[i]`` sits at row
    ``batch_rows[i]`` of ``batch``; ``batch_size`` = |B_m|; ``weight`` = w_m.
    """

    batch: Any
    batch_size: int
    state_rows: torch.Tensor
    batch_rows: torch.Tensor
    weight: float = 1.0


@dataclass(frozen=True)
class StepRecord:
    """One real optimizer step t, moving θ_t to θ_{t+1}.

    Attributes:
        step: the global step index t (Lightning's ``global_step`` before the update).
        epoch: the training epoch the step belongs to.
        optimizer: per-group hyper-parameters, ``theta`` (θ_t, ``Tensor[p]``), the gradient the optimizer
            consumed (after clipping) and Adam's post-step moments.
        raw_grad: the unclipped gradient ``Tensor[p]`` (all processes' contributions summed).
        micro_batches: this process's micro-batches of the step, in training order.
        clip: the step's gradient clipping bound to ``raw_grad`` (None: no clipping).
        frozen: values at θ_t of the trainable parameters that are not tracked (constants of the
            counterfactual), ``{name: Tensor}``.
        loss_scale: the GradScaler's scale when the gradient was read (None without a scaler).
        pre_state: flat copies of the optimizer state before the step, read only on self-checked steps and
            at trajectory checkpoints.
    """

    step: int
    epoch: int
    optimizer: OptimizerStep
    raw_grad: torch.Tensor
    micro_batches: tuple[MicroBatchRecord, ...] = ()
    clip: GradientClip | None = None
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_scale: float | None = None
    pre_state: dict[str, torch.Tensor | None] | None = None

    @property
    def theta(self) -> torch.Tensor:
        """θ_t: ``Tensor[p]``."""
        return self.optimizer.theta

    def skipped_by_scaler(self, scale_after: float | None) -> bool:
        """Whether a GradScaler skipped this step: a non-finite gradient, or a scale that ``update()``
        lowered after it (it does so after every skip, also when the inf/NaN appeared after the
        gradient was read)."""
        if self.loss_scale is None:
            return False
        if not bool(torch.isfinite(self.raw_grad).all()):
            return True
        return scale_after is not None and scale_after < self.loss_scale


Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the data-parallel processes (None where there is one process)."""

Agree = Callable[[Any], Any]
"""Returns rank zero's value of a picklable object on every data-parallel process (None where there is one): what
decides the collectives of a step (how many, what shapes) must be the same on every process."""


@dataclass(frozen=True)
class BookedStep:
    """One optimizer step as a fit books it, handed to each of its step consumers in turn.

    Attributes:
        record: what the optimizer consumed.
        after: θ_{t+1} (``Tensor[p]``), the tracked parameters once the optimizer stepped.
        index: how many steps the fit booked before this one (0 for its first).
        tracked: the fit's forward-tracked rows of each micro-batch of ``record``, in the same order.
        reduce: sums a tensor over data-parallel processes (None: one process).
    """

    record: StepRecord
    after: torch.Tensor
    index: int
    tracked: tuple[MicroBatch, ...] = ()
    reduce: Reduce | None = None


class StepConsumer(Protocol):
    """Anything a fit hands its booked steps to, in the order of its list (a failure stops the booking)."""

    def book(self, step: BookedStep) -> None:
        """Consume one booked optimizer step."""
