"""``TrackedFit``: everything one ``fit`` tracks, behind a small API that never sees the Trainer.

The callback creates one ``TrackedFit`` when training starts and translates Lightning's hooks into:

- :meth:`TrackedFit.add_micro_batch` / :meth:`~TrackedFit.drop_micro_batch` for every training batch;
- :meth:`TrackedFit.read_step` just before the optimizer steps (θ_t, the gradient, hyper-parameters);
- :meth:`TrackedFit.complete_step` once it has stepped: the :class:`~lightning_influence.records.StepRecord` is
  built, complete, and goes to every step consumer in turn (the estimator, the self-check, the audit, the
  trajectory recorder), booked atomically (completely or not at all, whatever interrupts it);
- :meth:`TrackedFit.close_windows` at window boundaries and :meth:`TrackedFit.finish` at the end.

Its ``state_dict`` is what a checkpoint carries; the results (``influence``, ``windows``) are read from
it after fit. Nothing here knows Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator

import torch

from lightning_influence.autodiff.draws import DrawnBatch, RandomDraws
from lightning_influence.core.booking import EstimatorBooking, FiniteStatesCheck, SelfCheckBooking
from lightning_influence.core.config import TrackerConfig
from lightning_influence.core.interrupts import InterruptGuard
from lightning_influence.core.selfcheck import ParameterWatch
from lightning_influence.core.state import (
    BookingClock,
    FitCheckpoint,
    FitContext,
    FitParts,
    read_side_file,
    write_side_file,
)
from lightning_influence.errors import NonFiniteInfluenceError, SampleIdError
from lightning_influence.estimators.base import Estimator, Reduce
from lightning_influence.optimizers import OptimizerStep, flat_optimizer_state, read_step_groups
from lightning_influence.optimizers.clipping import GradientClip, NormClip, ValueClip
from lightning_influence.records import BookedStep, MicroBatch, MicroBatchRecord, StepConsumer, StepRecord
from lightning_influence.results.audit import AuditReport
from lightning_influence.results.result import InfluenceResult
from lightning_influence.results.windows import WindowRecorder, WindowSnapshot
from lightning_influence.sample_ids import RowIndex, validate_sample_ids


class TrackedFit:
    """One fit's tracking state.

    Args:
        config: the tracker's configuration.
        parts: the pieces it computes with (see :func:`~lightning_influence.core.build.build_fit`).
        tracked_ids: ``LongTensor[k]`` of tracked training-set ids (row r of every state is sample ``tracked_ids[r]``).
        num_samples: the training set's size.
        start_step: the Trainer's step count when the fit starts (its first window starts there).
        context: what it needs from the Trainer.
    """

    def __init__(
        self,
        config: TrackerConfig,
        parts: FitParts,
        tracked_ids: torch.Tensor,
        num_samples: int,
        start_step: int,
        context: FitContext,
    ) -> None:
        self.config, self.parts, self.context = config, parts, context
        self.num_samples = num_samples
        self.tracked_ids = tracked_ids
        self._rows = RowIndex(tracked_ids, num_samples)
        self.schedule = config.window_schedule
        self.recorder = WindowRecorder(tracked_ids, start_step)
        self.state = FitCheckpoint(tracked_ids.numel(), start_step)
        self.clock = BookingClock()
        self.watch = ParameterWatch()
        self.interrupts = InterruptGuard()
        # a forward that draws: each micro-batch keeps the random state it starts from (the CPU generator's, and
        # the CUDA device's on a GPU), to replay its draws; None for a forward that does not draw
        device = parts.params.device
        cuda = (device.index or 0,) if device.type == "cuda" else ()
        self._draws_devices = cuda if parts.queries.loss.coupled else None
        self._micro: list[MicroBatchRecord] = []
        self._pending: StepRecord | None = None  # read before the step; its micro-batches and post-step state after
        booking = EstimatorBooking(parts.estimator, self.clock)
        self.consumers: list[StepConsumer] = [
            booking,
            SelfCheckBooking(parts.self_check, booking, parts.recompute_gradient),
            FiniteStatesCheck(parts.estimator, tracked_ids),
            *(c for c in (parts.audit, parts.recorder) if c is not None),
        ]
        """The step consumers, in booking order (a failure stops the booking and marks the fit broken)."""
        self.final: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None  # θ_T and the untracked values
        self._pre_forward: dict[str, torch.Tensor] = {}  # the running buffers before the step's first forward

    @property
    def estimator(self) -> Estimator:
        return self.parts.estimator

    # ------------------------------------------------------------------ every step
    def add_micro_batch(self, batch: Any) -> None:
        """Queue one training batch (rows identified by ``config.sample_ids``) for the next optimizer step."""
        if self.context.expect_indexed and not (isinstance(batch, dict) and "sample_id" in batch):
            raise SampleIdError(
                "The training set is not an IndexedDataset, so its batches carry no sample ids (the default reader"
                " would take the last element, e.g. the labels, as ids). Wrap it: DataLoader(IndexedDataset(dataset),"
                " ...), or pass sample_ids=lambda batch: ... returning LongTensor[B] of training-set indices."
            )
        ids = validate_sample_ids(self.config.sample_ids(batch), None, self.num_samples)
        running = self.parts.params.running
        if running and not self._micro:  # the step's first forward: the running buffers r_t before it moves them
            self._pre_forward = {n: b.detach().clone() for n, b in running.items()}
        if self._draws_devices is not None:
            batch = DrawnBatch(batch, RandomDraws.capture(self._draws_devices))
        self._micro.append(MicroBatchRecord(batch, ids, self.context.micro_batch_weight))

    def drop_micro_batch(self) -> None:
        """The last queued batch contributed no gradient (``training_step`` returned None)."""
        if self._micro:
            self._micro.pop()

    def read_step(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        epoch: int,
        clip: tuple[str, float] | None,
        loss_scale: float | None,
    ) -> None:
        """Record θ_t, the gradient the optimizer is about to consume and its hyper-parameters at step ``step``.

        ``clip``: the Trainer's ``(algorithm, value)`` gradient clipping, or None.
        """
        params = self.parts.params
        raw_grad = params.grad(step)
        if raw_grad is None:
            return  # training_step returned None: the optimizer skips this step, and so does every counterfactual
        theta = params.theta()
        self.watch.check(theta, f"the start of optimizer step {step}")
        groups = read_step_groups(optimizer, [list(g) for g in params.groups], params.layout.group_slices)
        recorder = self.parts.recorder
        if recorder is not None:
            recorder.read(optimizer, step)
        wants_state = self.parts.self_check.wants(self.state.steps_booked) or (
            recorder is not None and recorder.wants_checkpoint(step)
        )
        bound = (
            None
            if loss_scale is not None and not bool(torch.isfinite(raw_grad).all())
            else self._clip(clip, raw_grad, optimizer)
        )
        self._pending = StepRecord(
            step=step,
            epoch=epoch,
            optimizer=OptimizerStep(groups, theta, raw_grad if bound is None else bound.clipped),
            raw_grad=raw_grad,
            clip=bound,
            frozen={**params.frozen(running=False), **self._pre_forward},  # the running buffers as the step found them
            loss_scale=loss_scale,
            pre_state=flat_optimizer_state(optimizer, params.flat) if wants_state else None,
        )

    def _clip(
        self, clip: tuple[str, float] | None, raw_grad: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> GradientClip | None:
        if clip is None:
            return None
        algorithm, value = clip
        if algorithm == "value":
            return ValueClip(raw_grad, value)
        # the global norm runs over all the optimizer's parameters, tracked or not
        return NormClip(raw_grad, value, self.parts.params.other_grad_sq_norm(optimizer))

    def complete_step(self, optimizer: torch.optim.Optimizer, steps_after: int, scale_after: float | None) -> None:
        """The optimizer has stepped (Lightning's step count is now ``steps_after``): book the step atomically."""
        record, self._pending = self._pending, None
        micro, self._micro = self._micro, []
        with self._atomic(steps_after):
            after = self.parts.params.theta()  # θ_{t+1}: read once, for the self-check and the next step's watch
            if record is not None and not record.skipped_by_scaler(scale_after):
                self._book(self._record(record, micro, optimizer), after)
            self.state.handled(steps_after, None if record is None else record.epoch)
            self.watch.expect(steps_after, after)

    def complete_interrupted_step(self, optimizer: torch.optim.Optimizer, steps_now: int, scale: float | None) -> None:
        """An exception interrupted Lightning between the optimizer step and the batch-end hook: book that step,
        so that a checkpoint saved now holds the tracker at the model's step."""
        if self._pending is not None and steps_now == self._pending.step + 1 and self.state.broken is None:
            self.complete_step(optimizer, steps_now, scale)
        self.interrupts.release()  # the fit ends here

    @contextmanager
    def _atomic(self, steps_after: int) -> Iterator[None]:
        # Ctrl+C waits for the end of the booking; any other failure marks the fit broken, so that no
        # checkpoint can carry half-advanced states into a resumed run.
        with self.interrupts.booking():
            try:
                yield
            except BaseException as err:
                self.state.broken = f"booking optimizer step {steps_after - 1} failed ({type(err).__name__}: {err})"
                raise

    def _record(
        self, pending: StepRecord, micro: list[MicroBatchRecord], optimizer: torch.optim.Optimizer
    ) -> StepRecord:
        """The complete step record: what was read before the step, the micro-batches, the post-step state its
        optimizer model reads (Adam's moments)."""
        opt_step, keys = pending.optimizer, self.parts.post_state_keys
        # only the estimators of tracked samples and the audit read it (not a recording alone: track=())
        if keys and (self.tracked_ids.numel() or self.parts.audit is not None):
            opt_step = opt_step.with_post_state(flat_optimizer_state(optimizer, self.parts.params.flat, keys))
        return replace(pending, optimizer=opt_step, micro_batches=tuple(micro))

    def _book(self, record: StepRecord, after: torch.Tensor) -> None:
        tracked = tuple(self._tracked_rows(m) for m in record.micro_batches)
        booked = BookedStep(record, after, self.state.steps_booked, tracked, self.context.reduce)
        for consumer in self.consumers:
            consumer.book(booked)
        self.state.steps_booked += 1

    def _tracked_rows(self, micro: MicroBatchRecord) -> MicroBatch:
        part = self._rows.part(micro)
        if part.state_rows.numel():
            self.state.seen[part.state_rows] = True
        return part

    # ------------------------------------------------------------------ windows
    def close_windows(self, end_step: int, epoch: int) -> None:
        """Close every registered query's current window at the current parameters θ(end_step)."""
        if not self.config.queries or end_step <= self.recorder.last_boundary:
            return  # no optimizer step since the last boundary (e.g. an epoch and a step window coincide)
        theta, frozen = self.parts.params.theta(), self.parts.params.frozen()
        for name in self.config.queries:
            where = f"at the window ending at step {end_step}"
            probe = self.parts.queries.probe(name, theta, frozen, where)
            scores = self.estimator.totals(name, probe)
            self._check_scores(scores, probe.label)  # before any sink writes the window
            snapshot = self.recorder.close(name, end_step, epoch, scores)
            for sink in self.context.sinks:
                sink.window(snapshot, self.recorder)
            if self.parts.audit is not None:
                self.parts.audit.close(name, end_step, epoch, probe, snapshot.scores)

    def close_missed_windows(self, current_epoch: int) -> None:
        """Close a window whose boundary passed without its hook running: the step-window close of a step booked
        just before an interruption, or the end of an epoch whose last batch was checkpointed before the epoch-end
        hook (a resumed run; called when training starts). The parameters have not moved since that boundary."""
        step, last_epoch = self.state.global_step, self.state.last_epoch
        due_step = self.schedule.closes_after_step(step) and self.state.steps_booked > 0
        due_epoch = (
            last_epoch is not None and current_epoch > last_epoch and self.schedule.closes_after_epoch(last_epoch)
        )
        if due_step or due_epoch:
            self.close_windows(step, last_epoch or 0)

    def finish(self, reduce_seen: Reduce | None = None) -> None:
        """The end of fit: keep θ_T, close the last window, publish the final scores."""
        self.interrupts.release()
        self.final = (self.parts.params.theta(), self.parts.params.frozen())
        self.watch.check(self.final[0], "the end of fit")
        self.close_windows(self.state.global_step, self.state.last_epoch or 0)
        if reduce_seen is not None:  # each process saw its own shard
            self.state.seen = reduce_seen(self.state.seen.to(torch.float32)).cpu() > 0
        if self.parts.recorder is not None:
            self.parts.recorder.finish(self.state.global_step, self.final[0])
        results = {name: self.influence(name) for name in self.config.queries}
        metadata = {**self.context.metadata, "steps": self.state.global_step, "steps_booked": self.state.steps_booked}
        for sink in self.context.sinks:
            sink.final(results, metadata)

    # ------------------------------------------------------------------ results
    @property
    def unseen_ids(self) -> torch.Tensor:
        """``LongTensor``: tracked ids that no booked step consumed (influence exactly 0)."""
        return self.tracked_ids[~self.state.seen]

    def influence(self, query: Any, per_example: bool = False) -> InfluenceResult:
        """Scores of every tracked sample on ``query`` at θ_T (see ``InfluenceTracker.influence``)."""
        if self.final is None:
            raise RuntimeError("influence() is available once the fit has finished training.")
        theta, frozen = self.final
        device = self.parts.params.device
        theta, frozen = theta.to(device), {n: t.to(device) for n, t in frozen.items()}
        where = f"at the end of fit (step {self.state.global_step})"
        probe, name = self.parts.queries.probe(query, theta, frozen, where), self.config.estimator
        if per_example:
            if not self.config.estimator_spec.per_example:
                raise ValueError("per_example=True is not available with estimator='tracin'.")
            per = self.estimator.answer(probe, per_example=True).cpu()
            self._check_scores(per, probe.label)
            return InfluenceResult(self.tracked_ids.clone(), per.mean(dim=1), per, name)
        scores = self.estimator.totals(query, probe) if isinstance(query, str) else self.estimator.answer(probe)
        self._check_scores(scores, probe.label)
        return InfluenceResult(self.tracked_ids.clone(), scores.detach().cpu().clone(), None, name)

    def _check_scores(self, scores: torch.Tensor, label: str) -> None:
        """Refuse NaN/inf scores (``Tensor[k]`` or ``Tensor[k, n]``), naming the query and the first samples."""
        finite = torch.isfinite(scores.detach())
        if bool(finite.all()):
            return
        finite = finite.flatten(1).all(dim=1) if finite.dim() > 1 else finite
        ids = self.tracked_ids[(~finite).nonzero().flatten().cpu()].tolist()
        raise NonFiniteInfluenceError(
            f"{label}: the scores of {len(ids)} tracked sample(s) are NaN or inf (sample ids {ids[:10]}), so"
            " nothing is scored or written. The query's value and gradient are finite: the states or the"
            " counterfactual values overflow; train in float64 (precision='64-true') or lower the learning rate."
        )

    def windows(self, query: str) -> list[WindowSnapshot]:
        return self.recorder.windows(query)

    def audit(self, query: Any) -> AuditReport:
        """The whole run's audit on ``query`` (a registered name or any query): exact against the main estimator."""
        if self.parts.audit is None:
            raise RuntimeError("No audit runs: pass audit=N (or audit_ids=[...]) to InfluenceTracker.")
        main = self.influence(query).scores
        assert self.final is not None  # influence() above raises before the end of fit
        theta, frozen = self.final
        device = self.parts.params.device
        probe = self.parts.queries.probe(query, theta.to(device), {n: t.to(device) for n, t in frozen.items()})
        return self.parts.audit.report(query if isinstance(query, str) else "query", probe, main)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = self.state.to_dict(self.tracked_ids, self.estimator, self.recorder)
        if self.parts.audit is not None:
            state["audit"] = self.parts.audit.state_dict()
        if self.context.states_file is not None:
            heavy = {"estimator": state.pop("estimator"), "audit": state.pop("audit", None)}
            write_side_file(self.context.states_file, state["global_step"], heavy, self.context.writes_files)
            state["side_file"] = self.context.states_file
        return state

    def load_state_dict(self, state: dict[str, Any], global_step: int | None) -> None:
        """Apply a checkpoint's (or a finished fit's) state; ``global_step`` is the model's step count."""
        if "side_file" in state:
            state = {**state, **read_side_file(state["side_file"], state["global_step"])}
        self.state = FitCheckpoint.restore(state, self.tracked_ids, self.estimator, self.recorder, global_step)
        if self.parts.audit is not None:
            self.parts.audit.load_state_dict(state["audit"], self.recorder)

    def continues(self, previous: TrackedFit | None, global_step: int) -> bool:
        """Whether this fit continues ``previous`` (same model, same trainer step, parameters untouched since)."""
        if previous is None or previous.final is None or previous.state.global_step != global_step or global_step == 0:
            return False
        same_layout = previous.parts.params.layout == self.parts.params.layout
        if not same_layout or not torch.equal(previous.tracked_ids, self.tracked_ids):
            return False
        return previous.config.state_key_fields() == self.config.state_key_fields() and torch.equal(
            previous.final[0], self.parts.params.theta()
        )


__all__: Sequence[str] = ["FitContext", "FitParts", "TrackedFit"]
