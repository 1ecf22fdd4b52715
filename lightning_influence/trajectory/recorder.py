"""Recording the trajectory of a fit while it trains: one consumer of the step record ([concepts.md: Every sample at
once]).

Per booked optimizer step, :class:`TrajectoryRecorder` appends a
:class:`~lightning_influence.trajectory.reader.StepEntry` (the step's micro-batches as sample ids and
weights, every process's; per-group hyper-parameters; the clip; fingerprints of θ_t and of the
gradient), and every ``checkpoint_every`` steps it stores the pre-step parameters and optimizer
state. The format is described in :mod:`lightning_influence.trajectory.reader`; the replay that scores every
sample from it is :mod:`lightning_influence.trajectory.replay`. Nothing here knows Lightning.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from lightning_influence.autodiff.draws import DrawnBatch, unwrap
from lightning_influence.autodiff.layout import FlatParameters
from lightning_influence.autodiff.parameters import TrackedParameters
from lightning_influence.optimizers import flat_optimizer_state, read_step_groups
from lightning_influence.optimizers.clipping import GradientClip, NormClip, ValueClip
from lightning_influence.records import BookedStep, StepRecord
from lightning_influence.trajectory.fingerprint import fingerprint_spec, fingerprint_stride, fingerprint_tensor
from lightning_influence.trajectory.reader import StepEntry, TrajectoryWriter

FINGERPRINT_SEED = 20250101
FINGERPRINT_SIZE = 4

_MAX_PENDING = 64  # writes queued for the writing thread at most; the training thread waits beyond

GatherIds = Callable[[torch.Tensor], list[torch.Tensor]]
"""Every process's copy of a 1-D id tensor, in rank order (a single process: ``[ids]``)."""


def trajectory_meta(
    layout: FlatParameters,
    optimizer_kind: str,
    momentum: bool,
    dtype: torch.dtype,
    num_samples: int,
    autocast: tuple[str, torch.dtype] | None = None,
    **more: Any,
) -> dict[str, Any]:
    """The ``meta.json`` of a recorded run (see :mod:`lightning_influence.trajectory.reader`).

    ``optimizer_kind`` is the model's kind (:data:`~lightning_influence.optimizers.registry.OPTIMIZER_KINDS`):
    a variant with other state blocks has its own kind (``"rmsprop-centered"``, ``"adam-amsgrad"``), so
    ``meta["optimizer"] = {"kind", "momentum"}`` rebuilds the model as before and older trajectories still load.
    ``autocast``: ``(device type, dtype)`` of the autocast the training forward ran under (bf16-mixed, 16-mixed),
    stored as ``meta["autocast"] = {"device_type": "cpu", "dtype": "bfloat16"}``; without autocast the key is
    absent, as in every trajectory recorded before it existed."""
    if autocast is not None:
        more = {"autocast": {"device_type": str(autocast[0]), "dtype": str(autocast[1]).replace("torch.", "")}, **more}
    return {
        "layout": {
            "names": list(layout.names),
            "shapes": [list(s) for s in layout.shapes],
            "group_slices": [[s.start, s.stop] for s in layout.group_slices],
        },
        "optimizer": {"kind": optimizer_kind, "momentum": bool(momentum)},
        "dtype": str(dtype).replace("torch.", ""),
        "num_samples": int(num_samples),
        # stride: the elements a fingerprint reads (absent in trajectories recorded before it existed: 1, every one)
        "fingerprint": {"seed": FINGERPRINT_SEED, "size": FINGERPRINT_SIZE, "stride": fingerprint_stride(layout.numel)},
        **more,
    }


def _writing_thread_setup() -> None:
    """Runs first in the writing thread: one intra-op thread for its torch calls (copies, ``torch.save``), so that they
    never start a second team of threads competing with training's for the cores, and, on Linux, a lower scheduling
    priority (nice + 10, this thread only): training threads go first, the files are written in the gaps."""
    torch.get_num_threads()  # torch sets a thread's count up at its first call: now, not after the next line
    torch.set_num_threads(1)  # this thread's team; the caller restores the default that later threads inherit
    if sys.platform.startswith("linux"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
        except (AttributeError, OSError):  # no per-thread priorities here: the thread keeps the process's
            pass


def clip_entry(clip: GradientClip | None, all_parameters: bool = False) -> dict[str, Any] | None:
    """The clip of a step as the trajectory stores it (``all_parameters``: the recorded layout holds every
    parameter the optimizer clips, so no gradient norm is left outside it)."""
    if isinstance(clip, NormClip):
        other = 0.0 if all_parameters else clip.other_sq_norm
        return {"kind": "norm", "max_norm": clip.max_norm, "other_sq_norm": other}
    if isinstance(clip, ValueClip):
        return {"kind": "value", "clip_value": clip.clip_value}
    return None


class TrajectoryRecorder:
    """Writes one fit's trajectory (rank zero writes; every process contributes its sample ids).

    Args:
        dirpath: the trajectory folder.
        meta: from :func:`trajectory_meta`.
        checkpoint_every: store the pre-step state every this many steps (and at the first step recorded).
        record_batches: also store each step's collated batches (needed when the dataset cannot be re-read).
        gather: collects the processes' ids of one micro-batch.
        writes: this process writes the files (rank zero).
        resume_from_step: the step a resumed fit starts at (the trajectory is cut back to it).
        running: the running buffers the training forward moves (BatchNorm in train mode), by name, live: each
            checkpoint stores their values as its step found them (from the step record's ``frozen``), the final
            state their values at the end.
    """

    def __init__(
        self,
        dirpath: str | Path,
        meta: dict[str, Any],
        checkpoint_every: int,
        record_batches: bool = False,
        gather: GatherIds | None = None,
        writes: bool = True,
        params: TrackedParameters | None = None,
        running: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.running = dict(running or {})
        self.meta = meta
        self.checkpoint_every = checkpoint_every
        self.record_batches = record_batches
        self.gather = gather or (lambda ids: [ids])
        self.writes = writes
        self._writer: TrajectoryWriter | None = None
        self._opened: TrajectoryWriter | None = None  # the writer of this session, closed or not (for abort())
        self._checkpointed = False  # this session wrote a checkpoint (a resumed one must start with one)
        # files are written by one background thread, in submission order, so that checkpoint writes (a
        # torch.save and an fsync) do not stall training; a failure surfaces at the next call
        self._io: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        # params= tracks a subset: the trajectory still holds every trainable parameter, read here
        self.params = params
        self._full: tuple[torch.Tensor, torch.Tensor, list, dict | None] | None = None

    def start(self, resume_from_step: int | None) -> None:
        """Open the trajectory: fresh (``None``), or continuing a fit that resumes at ``resume_from_step``."""
        if self.writes:
            self.abort()  # an earlier session of this recorder that no one closed
            self._writer = self._opened = TrajectoryWriter(self.dirpath, self.meta, resume_from_step=resume_from_step)
            threads = torch.get_num_threads()
            self._io = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="lightning-influence-trajectory", initializer=_writing_thread_setup
            )
            self._io.submit(int).result()  # the thread starts now, and sets itself up
            torch.set_num_threads(threads)  # the default of threads started later (the setup changed it)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()  # re-raises a failed write here, in the training thread
        while len(self._pending) >= _MAX_PENDING:  # the writing thread fell behind (a slow disk, a busy machine):
            self._pending.pop(0).result()  # wait, so that the steps held for it (θ_t, gradients, batches) stay few
        assert self._io is not None
        self._pending.append(self._io.submit(fn, *args))

    def read(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Just before optimizer step ``step``, when ``params`` is a wider set than the tracked one: its θ_t,
        gradient, per-group hyper-parameters and (when a checkpoint is due) optimizer state."""
        if self.params is None:
            return
        grad = self.params.grad(step)
        if grad is None:
            self._full = None
            return
        groups = read_step_groups(optimizer, [list(g) for g in self.params.groups], self.params.layout.group_slices)
        state = flat_optimizer_state(optimizer, self.params.flat) if self.wants_checkpoint(step) else None
        self._full = (self.params.theta(), grad, groups, state)

    def wants_checkpoint(self, step: int) -> bool:
        """Whether step ``step``'s pre-step state is stored (the caller reads the optimizer state for it)."""
        return not self._checkpointed or step % self.checkpoint_every == 0

    def book(self, step: BookedStep) -> None:
        """Append one booked step (a step consumer); the record's ``pre_state`` is the optimizer state before it,
        read when a checkpoint is due."""
        record, pre_state = step.record, step.record.pre_state
        micro = []
        for m in record.micro_batches:  # every process's micro-batches, rank-major (a collective call)
            micro.append([(ids, m.weight) for ids in self.gather(m.sample_ids)])
        due, self._checkpointed = self.wants_checkpoint(record.step), True
        if not self.writes or self._writer is None:
            return
        theta, raw_grad, group_steps, pre_state = (
            (record.theta, record.raw_grad, record.optimizer.groups, pre_state) if self._full is None else self._full
        )
        if due:  # θ_t, the flat optimizer state and the buffers are fresh copies: the writing thread owns them
            state = {k: None if v is None else v.detach() for k, v in (pre_state or {}).items()}
            buffers = {n: t for n, t in (record.frozen or {}).items() if n in self.running}
            self._submit(self._writer.write_checkpoint, record.step, theta, state, buffers)
        drawn = [m.batch for m in record.micro_batches]
        batches = [unwrap(b) for b in drawn] if self.record_batches else None
        draws = [b.draws.to_record() for b in drawn if isinstance(b, DrawnBatch)] or None
        ids = [(i, w) for rank_major in zip(*micro) for i, w in rank_major]
        self._submit(self._write_step, self._writer, record, group_steps, ids, (theta, raw_grad), batches, draws)

    def _write_step(
        self,
        writer: TrajectoryWriter,
        record: StepRecord,
        group_steps: Sequence[Any],
        ids: list[tuple[torch.Tensor, float]],
        vectors: tuple[torch.Tensor, torch.Tensor],
        batches: list[Any] | None,
        draws: list[dict] | None,
    ) -> None:
        """In the writing thread: the step's line, built from what :meth:`book` handed over (nothing changes it),
        with the fingerprints of θ_t and of the gradient (``vectors``: the step record's fresh flat copies).

        Their float64 pass over the sampled elements (at most about 65 K of each vector:
        :func:`~lightning_influence.trajectory.fingerprint.fingerprint_stride`) runs here, at the thread's lower
        priority and on its single intra-op thread, rather than in the training step: training threads leave cores
        idle between their parallel regions (the optimizer's small operations, data loading, Python)."""
        seed, size, stride = fingerprint_spec(self.meta)  # as the replay reads it back
        prints = [fingerprint_tensor(v, seed, size, stride=stride).tolist() for v in vectors]
        entry = StepEntry(
            step=record.step,
            epoch=record.epoch,
            groups=[{k: v for k, v in dataclasses.asdict(g).items() if k != "region"} for g in group_steps],
            micro_batches=[(i.tolist(), float(w)) for i, w in ids],
            clip=clip_entry(record.clip, all_parameters=self.params is not None),
            fingerprint={"theta": prints[0], "grad": prints[1]},
        )
        writer.write_step(entry, batches, draws)

    def finish(self, step: int, theta: torch.Tensor) -> None:
        """The end of fit: θ_T after ``step`` steps; waits until every file is written; the trajectory is complete."""
        if self.params is not None:
            theta = self.params.theta()
        if self._writer is not None:
            buffers = {n: b.detach().clone() for n, b in self.running.items()}
            self._submit(self._writer.write_final, step, theta, buffers)
            self._submit(self._writer.close)
            self._writer = None
            self.flush()

    def abort(self) -> None:
        """The fit failed: wait for the files submitted so far (a failed write is not raised again: the fit's own
        error is on its way), leave the trajectory unfinished (no end marker; ``steps.jsonl`` closed, the writer's
        lock removed) and stop the writing thread. Idempotent; nothing to do after :meth:`finish`."""
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                future.result()
            except Exception:  # noqa: BLE001, S110 - the error that failed the fit is already being raised
                pass
        if self._opened is not None:
            self._opened.abandon()  # a writer closed by finish() has nothing left to abandon
        self._writer = self._opened = None
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None

    def flush(self) -> None:
        """Wait for the files submitted so far (re-raising a failed write)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        if self._writer is None and self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
