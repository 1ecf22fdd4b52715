"""The recorded trajectory of one training run ([concepts.md: Every sample at once]): what a replay needs to rebuild
θ_t and the optimizer state at every step, written while training and readable without the callback (and without this
package).

Layout (``<artifact dir>/trajectory/``; every file carries ``"format"`` and ``"version"`` (1), and a reader must
refuse a newer version)::

    meta.json                  the run's description                 written atomically at start and at each resume
    steps.jsonl                one JSON line per booked optimizer step   appended, flushed per step
    checkpoints/step_<t>.pt    pre-step state of step t, every N steps   atomic (temporary file + os.replace)
    batches/step_<t>.pt        the collated micro-batches of step t      atomic, only when batches are recorded
    final.pt                   θ_T and frozen values after the last step atomic
    end.json                   the run closed cleanly                     atomic
    writing.lock               a writer is at work (its process id)      from the writer's start to its close

Steps t are global optimizer steps, 0-based, strictly increasing along the file (a skipped step, e.g. an AMP
overflow, leaves a gap: θ and the optimizer state did not change). Step t maps θ_t to θ_{t+1}.

``meta.json``: ``{"format": "lightning-influence/trajectory", "version": 1, "meta": {...}, "resumes": [s, ...]}``.
``meta`` is the caller's description of the run (parameter layout: names, shapes, group slices; optimizer kind;
dtype; num_samples; checkpoint_every_n_steps; fingerprint seed, size and stride (absent: 1); world size ...).
``resumes`` lists the steps s at which the run was resumed from a checkpoint (the recorded steps ≥ s were dropped
and rewritten).

``steps.jsonl``: one object per line, ``{"format": "lightning-influence/trajectory-step", "version": 1,
"step": t, "epoch": e, "groups": [...], "micro_batches": [[[ids...], w], ...], "clip": ..., "fingerprint": ...}``:

- ``groups``: per optimizer param group (in the optimizer's order), the hyper-parameters step t used: ``lr``,
  ``weight_decay``, ``momentum``, ``dampening``, ``nesterov``, ``first_momentum_step`` (SGD: the momentum buffer
  did not exist before the step), ``beta1``, ``beta2``, ``eps``, ``step`` (Adam's count after the update).
  Learning rates are in the optimizer's own units (after schedulers).
- ``micro_batches``: the micro-batches of the step (gradient accumulation; under DDP every rank's, rank-major):
  the dataset indices (sample ids) in row order and the weight w_m, so that the step gradient is
  Σ_m (w_m/|B_m|) Σ_{i∈B_m} ∇ℓ_i(θ_t) + ∇R(θ_t).
- ``clip``: ``null``, ``{"kind": "norm", "max_norm": c, "other_sq_norm": x}`` (x: squared norm of the untracked
  trainable gradients) or ``{"kind": "value", "clip_value": c}``.
- ``fingerprint``: ``{"theta": [...], "grad": [...]}``: ``fingerprint(θ_t)`` and of the gradient the optimizer
  received (before clipping), with the seed and size of ``meta``; see :mod:`lightning_influence.trajectory.fingerprint`.

Floats are written with Python's ``repr`` (float64 round-trips exactly; non-finite values as ``NaN``,
``Infinity``). A crash may leave a truncated last line: readers drop it (with a warning).

``checkpoints/step_<t>.pt`` (``torch.save``; ``torch.load(weights_only=True)`` reads it): ``{"format":
"lightning-influence/trajectory-checkpoint", "version": 1, "step": t, "theta": Tensor[p] (θ_t, the flat tracked
parameters in meta's layout and dtype), "optimizer_state": {name: Tensor[p] or None} (the state before step t,
e.g. momentum_buffer or exp_avg, exp_avg_sq), "frozen": {name: Tensor} (untracked tensors: frozen parameters,
buffers)}``.

``batches/step_<t>.pt``: ``{"format": "lightning-influence/trajectory-batches", "version": 1, "step": t,
"batches": [batch of micro-batch 0, ...]}`` (tensors, lists, tuples, dicts, numbers, strings).

``final.pt``: ``{"format": "lightning-influence/trajectory-final", "version": 1, "step": T, "theta": Tensor[p],
"frozen": {...}}``, the state after the last step. ``end.json``: ``{"format": "lightning-influence/trajectory-end",
"version": 1, "last_step": t, "final_step": T or null}``.

``writing.lock``: ``{"format": "lightning-influence/lock", "version": 1, "pid": ..., "host": ..., "started": ...,
"what": ...}``, created exclusively when a writer starts and removed when it closes or fails (0.1.0 wrote none). While
its process runs, :func:`load_trajectory` in any other process refuses the folder; a lock whose process has died is
stale and ignored. A trajectory without ``end.json`` is unfinished (the run crashed, failed or still runs): it loads
(``complete`` is False) but a replay refuses it.

Durability: step lines are flushed every step and fsynced at each checkpoint and at the end, so a crash loses at
most the current segment; checkpoint, batch and final files are whole or absent. A segment is a checkpoint and the
steps from it up to the next checkpoint: a replay rebuilds its states from the checkpoint. Nothing here knows
Lightning.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

from lightning_influence.autodiff.draws import RandomDraws
from lightning_influence.errors import FolderInUseError, UnfinishedTrajectoryError
from lightning_influence.io.files import PathLike, lock_holder
from lightning_influence.trajectory.fingerprint import (
    DEFAULT_CHECKPOINT_EVERY,
    default_checkpoint_every,
    fingerprint,
    fingerprints_match,
)
from lightning_influence.trajectory.format import (
    BATCH_DIR,
    BATCH_FORMAT,
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    DRAWS_DIR,
    DRAWS_FORMAT,
    END_FILE,
    END_FORMAT,
    FINAL_FILE,
    FINAL_FORMAT,
    META_FILE,
    META_FORMAT,
    STEPS_FILE,
    TRAJECTORY_DIR,
    TRAJECTORY_VERSION,
    VOLATILE_META_KEYS,
    WRITING_FILE,
    StepEntry,
    check_header,
    decode_step,
    listed_steps,
    load_torch,
    read_step_lines,
    step_file,
)
from lightning_influence.trajectory.processes import Launcher, ReplayTask, answer
from lightning_influence.trajectory.writer import TrajectoryWriter

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "TRAJECTORY_DIR",
    "TRAJECTORY_VERSION",
    "VOLATILE_META_KEYS",
    "StepEntry",
    "Trajectory",
    "TrajectoryWriter",
    "default_checkpoint_every",
    "fingerprint",
    "fingerprints_match",
    "load_trajectory",
]


class Trajectory:
    """A loaded trajectory (see :func:`load_trajectory`); tensors are read from disk on demand.

    Attributes:
        path: the trajectory folder.
        meta: the run's description (``meta.json``'s ``meta``).
        resumes: the steps at which the run was resumed.
        steps: the booked steps in file order.
        checkpoint_steps: sorted steps t with a ``checkpoints/step_<t>.pt``.
        final_step: T of ``final.pt``, or None without one.
        complete: whether ``end.json`` exists (the writer was closed after the run).
        launcher: starts the processes of a replay with ``devices > 1``
            (:data:`~lightning_influence.trajectory.processes.Launcher`; None: one process only).
    """

    def __init__(
        self,
        path: Path,
        header: dict[str, Any],
        steps: list[StepEntry],
        final_step: int | None,
        launcher: Launcher | None = None,
    ) -> None:
        self.path = path
        self.launcher = launcher
        self.meta: dict[str, Any] = dict(header.get("meta", {}))
        self.resumes: list[int] = [int(s) for s in header.get("resumes", [])]
        self.steps = steps
        self.checkpoint_steps = listed_steps(path / CHECKPOINT_DIR)
        self.final_step = final_step
        self.complete = (path / END_FILE).is_file()

    def __repr__(self) -> str:
        return (
            f"Trajectory({str(self.path)!r}, steps={len(self.steps)}, checkpoints={len(self.checkpoint_steps)}, "
            f"final_step={self.final_step}, complete={self.complete})"
        )

    def checkpoint(self, step: int, map_location: Any = "cpu") -> dict[str, Any]:
        """The pre-step state of step ``step``: ``{"step", "theta": Tensor[p], "optimizer_state", "frozen", ...}``."""
        file = step_file(self.path / CHECKPOINT_DIR, step)
        if not file.is_file():
            raise FileNotFoundError(
                f"{self.path}: no checkpoint of step {step} (checkpoints: {self.checkpoint_steps})."
            )
        return load_torch(file, CHECKPOINT_FORMAT, map_location)

    def final(self, map_location: Any = "cpu") -> dict[str, Any]:
        """The state after the last step: ``{"step": T, "theta": Tensor[p], "frozen": {...}, ...}``."""
        file = self.path / FINAL_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{self.path}: no {FINAL_FILE} (the run did not finish, or crashed before).")
        return load_torch(file, FINAL_FORMAT, map_location)

    def batches(self, step: int, map_location: Any = "cpu") -> list | None:
        """The collated micro-batches of step ``step`` (a list, one batch per micro-batch), or None if not recorded."""
        file = step_file(self.path / BATCH_DIR, step)
        if not file.is_file():
            return None
        return list(load_torch(file, BATCH_FORMAT, map_location)["batches"])

    def draws(self, step: int) -> list[RandomDraws] | None:
        """The random-stream state each micro-batch's forward of step ``step`` started from, or None (a model that
        does not draw)."""
        file = step_file(self.path / DRAWS_DIR, step)
        if not file.is_file():
            return None
        return [RandomDraws.from_record(r) for r in load_torch(file, DRAWS_FORMAT)["draws"]]

    def _check_finished(self) -> None:
        """:class:`UnfinishedTrajectoryError` unless the writer closed the trajectory (``end.json``, looked up now),
        :class:`FolderInUseError` while another process writes it."""
        _refuse_in_progress(self.path)
        if (self.path / END_FILE).is_file():
            return
        last = self.steps[-1].step if self.steps else None
        final = "" if (self.path / FINAL_FILE).is_file() else f" nor {FINAL_FILE}"
        raise UnfinishedTrajectoryError(
            f"{self.path}: the trajectory is unfinished: its writer did not close it (no {END_FILE}{final}; the last"
            f" recorded step is {last}). The run crashed, failed or was stopped, or it is still running in this"
            " process; replaying it would score a prefix of the run as if it were the whole run. Resume the fit from"
            " its last checkpoint (trainer.fit(..., ckpt_path=...)) so that it finishes, or record the run again."
        )

    def _order_problem(self) -> str | None:
        for before, after in zip(self.steps, self.steps[1:]):
            if after.step <= before.step:
                return f"step {after.step} follows step {before.step} (steps must strictly increase)"
        return None

    def segments(self) -> list[tuple[int, list[StepEntry]]]:
        """``(checkpoint step c, the steps t with c ≤ t < next checkpoint)`` in time order; segments without steps
        are left out. ``ValueError`` if steps do not increase or the first step has no checkpoint at or before it."""
        problem = self._order_problem()
        if problem:
            raise ValueError(f"{self.path}: {problem}.")
        out: list[tuple[int, list[StepEntry]]] = []
        for entry in self.steps:
            k = bisect.bisect_right(self.checkpoint_steps, entry.step) - 1
            if k < 0:
                raise ValueError(
                    f"{self.path}: step {entry.step} has no checkpoint at or before it (first checkpoint: "
                    f"{self.checkpoint_steps[0] if self.checkpoint_steps else None}); it cannot be replayed."
                )
            start = self.checkpoint_steps[k]
            if out and out[-1][0] == start:
                out[-1][1].append(entry)
            else:
                out.append((start, [entry]))
        return out

    def influence(
        self,
        module: Any,
        train_dataset: Any,
        query: Any,
        loss_fn: Any = None,
        devices: int = 1,
        accelerator: str = "cpu",
        **kwargs: Any,
    ) -> Any:
        """Scores of every sample that took part in a step on ``query`` at the final step: an
        :class:`~lightning_influence.results.result.InfluenceResult` (estimator ``"first-order"``; negative = harmful).

        ``module``: the trained architecture (its parameter values are not used); ``train_dataset[i]``: sample i as in
        training; ``loss_fn``: ``(module, batch) -> Tensor[B]`` (default ``module.per_sample_loss``). ``devices``: the
        processes that share the replay, each a part of every step's batch
        (:mod:`~lightning_influence.trajectory.shards`), started on ``accelerator`` by the trajectory's launcher
        (Lightning Fabric's for the package's ``load_trajectory``). ``kwargs``: ``per_example`` (and ``energy``, the
        query sketch of ``TrajectoryReplay.influence``), and
        :class:`~lightning_influence.trajectory.replay.TrajectoryReplay`'s options
        (``regularizer``, ``collate_fn``, ``move``, ``progress``, ``chunk_size``, ``tolerances``).
        """
        asked = {"per_example": bool(kwargs.pop("per_example", False)), "energy": kwargs.pop("energy", None)}
        task = self._task(module, train_dataset, loss_fn, "influence", (query,), asked, kwargs)
        return answer(task, devices, accelerator, self.launcher)

    def self_influence(
        self,
        module: Any,
        train_dataset: Any,
        loss_fn: Any = None,
        devices: int = 1,
        accelerator: str = "cpu",
        **kwargs: Any,
    ) -> Any:
        """The in-run self-influence of every sample id in [0, num_samples): an
        :class:`~lightning_influence.results.result.InfluenceResult` with ``estimator`` and ``definition``
        ``"in-run"``, s_j = Σ_t Σ_{m∋j} (η_t w_m/|B_m|) ⟨∇ℓ_j(θ_t), P_t ∇ℓ_j(θ_t)⟩ (P_t the optimizer's
        preconditioner; positive = helpful to its own loss; 0 for a sample no step consumed). Arguments as in
        :meth:`influence`; ``kwargs``: ``chunk_size`` (batch rows per per-sample-gradient call) and
        :class:`~lightning_influence.trajectory.replay.TrajectoryReplay`'s other options."""
        asked = {"chunk_size": kwargs.pop("chunk_size", None)}
        task = self._task(module, train_dataset, loss_fn, "self_influence", (), asked, kwargs)
        return answer(task, devices, accelerator, self.launcher)

    def windows(
        self,
        module: Any,
        train_dataset: Any,
        name: str,
        query: Any,
        boundaries: Any = None,
        loss_fn: Any = None,
        devices: int = 1,
        accelerator: str = "cpu",
        **kwargs: Any,
    ) -> list:
        """Window scores I(b) − I(a) of ``query`` (named ``name``) between consecutive boundaries (default: the recorded
        window schedule and the final step): a list of :class:`~lightning_influence.results.windows.WindowSnapshot`.
        Arguments as in :meth:`influence`."""
        task = self._task(module, train_dataset, loss_fn, "windows", (name, query, boundaries), {}, kwargs)
        return answer(task, devices, accelerator, self.launcher)

    def _task(self, module, train_dataset, loss_fn, method, args, asked, options) -> ReplayTask:
        return ReplayTask(self, module, train_dataset, method, args, asked, {"loss_fn": loss_fn, **options})

    def check_contiguous(self, allow_gaps: bool = True) -> None:
        """``ValueError`` listing every problem: steps that do not strictly increase, a first step without a
        checkpoint at or before it, a final step not after the last step; with ``allow_gaps=False`` also any gap
        in the step numbers (a segment that does not start at its checkpoint's step, or skips a step)."""
        problems = [p for p in (self._order_problem(),) if p]
        if not problems and self.steps:
            first = self.steps[0].step
            if not self.checkpoint_steps or self.checkpoint_steps[0] > first:
                problems.append(f"the first step {first} has no checkpoint at or before it")
            if self.final_step is not None and self.final_step <= self.steps[-1].step:
                problems.append(f"the final state's step {self.final_step} is not after the last step")
        if not problems and not allow_gaps:
            for start, entries in self.segments():
                expected = list(range(start, start + len(entries)))
                if [e.step for e in entries] != expected:
                    problems.append(f"the segment of checkpoint {start} does not hold steps {start}..{expected[-1]}")
        if problems:
            raise ValueError(f"{self.path}: the trajectory is not contiguous: {'; '.join(problems)}.")


def _resolve(path: PathLike) -> Path:
    p = Path(path)
    for candidate in (p, p / TRAJECTORY_DIR):
        if (candidate / META_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"No trajectory at {p}: expected {p / META_FILE} or {p / TRAJECTORY_DIR / META_FILE}. Pass the trajectory "
        f"folder or the influence artifact folder that holds {TRAJECTORY_DIR}/."
    )


def _refuse_in_progress(folder: Path) -> None:
    """:class:`FolderInUseError` while another live process holds the folder's ``writing.lock``."""
    holder = lock_holder(folder / WRITING_FILE, this_process=False)
    if holder is not None:
        raise FolderInUseError(
            f"{folder}: the trajectory is still being written ({holder}; {folder / WRITING_FILE} exists): reading it"
            " now would mix finished and unfinished files. Wait until that run ends (it removes the lock), then load"
            f" it. If no run writes there any more (e.g. it ran on another machine and died), delete {WRITING_FILE}."
        )


def load_trajectory(path: PathLike, launcher: Launcher | None = None) -> Trajectory:
    """Read a trajectory written by :class:`TrajectoryWriter`.

    Args:
        path: the trajectory folder, or its parent artifact folder containing ``trajectory/``.
        launcher: starts the processes of a replay on several (``devices > 1``); the package's public
            ``load_trajectory`` passes Lightning Fabric's.

    A trajectory whose writer did not finish (no ``end.json``: a crashed, failed or running fit) loads, with
    ``complete`` False, for inspection; a replay of it (:meth:`Trajectory.influence`, ``TrajectoryReplay``) raises
    :class:`~lightning_influence.errors.UnfinishedTrajectoryError`.

    Raises:
        FileNotFoundError: no ``meta.json`` there.
        ValueError: a corrupt step line other than the last, a wrong format or a newer version.
        FolderInUseError: another live process is writing the trajectory (it holds ``writing.lock``).
        DamagedFileError: ``final.pt`` is truncated or overwritten.
    """
    folder = _resolve(path)
    _refuse_in_progress(folder)
    meta_path = folder / META_FILE
    try:
        header = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path}: not valid JSON ({err}).") from err
    check_header(header, META_FORMAT, str(meta_path))
    steps_path = folder / STEPS_FILE
    steps = [decode_step(r, f"{steps_path}, step {r.get('step')}") for _, r in read_step_lines(steps_path)]
    final_step = None
    if (folder / FINAL_FILE).is_file():
        final_step = int(load_torch(folder / FINAL_FILE, FINAL_FORMAT, "cpu", mmap=True)["step"])
    if (folder / END_FILE).is_file():
        check_header(json.loads((folder / END_FILE).read_text(encoding="utf-8")), END_FORMAT, str(folder / END_FILE))
    _refuse_in_progress(folder)  # a writer that started while this read
    return Trajectory(folder, header, steps, final_step, launcher)
