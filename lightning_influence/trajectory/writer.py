"""Writing a trajectory while training; the format is described in :mod:`lightning_influence.trajectory.reader`.
Nothing here knows Lightning.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lightning_influence.errors import TrajectoryWriteError
from lightning_influence.io.files import FolderLock, PathLike, sync_files
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
    TRAJECTORY_VERSION,
    VOLATILE_META_KEYS,
    WRITING_FILE,
    StepEntry,
    atomic_json,
    atomic_torch_save,
    atomic_write,
    check_header,
    encode_step,
    listed_steps,
    plain,
    read_step_lines,
    step_file,
    storable,
)


def _meta_differences(recorded: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two meta dicts, ignoring :data:`VOLATILE_META_KEYS`."""
    out = []
    for key in sorted(set(recorded) | set(new)):
        if key in VOLATILE_META_KEYS or recorded.get(key) == new.get(key):
            continue
        old_value, new_value = (repr(m.get(key, "<absent>"))[:200] for m in (recorded, new))
        out.append(f"{key}: recorded {old_value}, now {new_value}")
    return out


def _remove_stale(directory: Path, first_step: int | None) -> int:
    """Delete ``step_<t>.pt`` with t ≥ ``first_step`` (all when None) and leftover temporary files; return the count."""
    removed = 0
    for t in listed_steps(directory):
        if first_step is None or t >= first_step:
            step_file(directory, t).unlink()
            removed += 1
    if directory.is_dir():
        for name in os.listdir(directory):
            if name.startswith(".") and name.endswith(".tmp"):
                (directory / name).unlink()
    return removed


def _os_cause(err: BaseException) -> OSError | None:
    """The operating system's error behind ``err`` (itself, or in its chain: torch.save reports a failed write as a
    ``RuntimeError`` whose context is the ``OSError``)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _is_write_failure(err: BaseException) -> bool:
    if isinstance(err, TrajectoryWriteError):
        return False
    if _os_cause(err) is not None:
        return True
    text = str(err)  # torch.save's stream writer, failing without a chained OSError
    return isinstance(err, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)


def _reason(err: BaseException) -> str:
    cause = _os_cause(err)
    if cause is None:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    code = cause.errno
    name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    text = cause.strerror or (os.strerror(code) if isinstance(code, int) else str(cause))
    return f"{text} (errno {code}{', ' + name if name else ''})" if code is not None else text


class TrajectoryWriter:
    """Writes the trajectory of one training run into ``dirpath`` (created with parents).

    Args:
        dirpath: the trajectory folder (conventionally ``<artifact dir>/trajectory``).
        meta: the run's description, JSON-serialisable (tuples become lists, tensors lists): parameter layout,
            optimizer kind, dtype, num_samples, checkpoint_every_n_steps, fingerprint seed, size and stride, world
            size...
        resume_from_step: None for a new run: an earlier trajectory in ``dirpath`` is deleted (with a warning).
            s for a run resumed from a checkpoint taken before global step s: steps, checkpoints and batches
            strictly before s are kept, later ones (and ``final.pt``, ``end.json``) deleted, and ``meta`` must
            equal the recorded meta except for :data:`VOLATILE_META_KEYS` (``ValueError`` naming the
            differences). Without a recorded trajectory, a new one is started.

    Only one process (rank 0) should write. Step lines are flushed at every step and fsynced at every
    checkpoint, at ``write_final`` and ``close``; checkpoints, batches and final state are written atomically.
    Checkpoints and the final state are fsynced as they are written; a step's batch and draws files are fsynced
    with the step lines (one batch of fsyncs per checkpoint instead of one per step): after a crash of the
    machine, what was written since the last checkpoint may be lost, as its step lines may.
    Tensors given to :meth:`write_checkpoint` and :meth:`write_final` are saved as they are when the call runs
    (CPU tensors with their own compact storage are not copied first): a caller that writes from another thread
    passes copies that nothing changes meanwhile (the recorder does).

    From its start to ``close`` (or a failure) the writer holds ``writing.lock`` in the folder (its process id):
    another live writer of the folder raises :class:`~lightning_influence.errors.FolderInUseError`, and
    :func:`~lightning_influence.trajectory.reader.load_trajectory` in another process refuses the folder. A write
    that fails (a full disk) raises :class:`~lightning_influence.errors.TrajectoryWriteError` naming the file, the
    step and the reason, and leaves the trajectory unfinished: ``steps.jsonl`` closed, no end marker, the lock
    removed; every later write raises it again. :meth:`abandon` does the same for a run that failed elsewhere.
    """

    def __init__(self, dirpath: PathLike, meta: Mapping[str, Any], resume_from_step: int | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.meta: dict[str, Any] = plain(dict(meta), "meta")
        self.last_step: int | None = None
        self.final_step: int | None = None
        self._failure: TrajectoryWriteError | None = None
        self._unsynced: list[Path] = []  # per-step files written since the last sync point (fsynced together)
        self._lock = FolderLock(self.dirpath / WRITING_FILE, "one trajectory folder")
        self._lock.acquire(
            "Record each run into its own folder: InfluenceTracker(dirpath=...) or another"
            " Trainer(default_root_dir=...)."
        )
        try:
            with self._writing(self.dirpath / META_FILE, None):
                if resume_from_step is not None and (self.dirpath / META_FILE).is_file():
                    resumes = self._resume(int(resume_from_step))
                else:
                    resumes = self._start_new()
                header = {"format": META_FORMAT, "version": TRAJECTORY_VERSION, "meta": self.meta, "resumes": resumes}
                atomic_json(self.dirpath / META_FILE, header)
                (self.dirpath / CHECKPOINT_DIR).mkdir(exist_ok=True)
                self._steps = open(self.dirpath / STEPS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        except BaseException:
            self._lock.release()
            raise

    @contextmanager
    def _writing(self, file: Path, step: int | None) -> Iterator[None]:
        """Around the writes of ``file`` for step ``step``: a failure abandons the trajectory (every handle closed);
        the operating system's failures become a :class:`TrajectoryWriteError` naming the file, the step and why."""
        try:
            yield
        except BaseException as err:
            if not _is_write_failure(err):
                self.abandon()
                raise
            where = "at its start" if step is None else f"at optimizer step {step}"
            cause = _os_cause(err)
            named = getattr(cause, "filename", None)
            if named and not str(named).endswith(".tmp"):  # the file the system names, unless our temporary one
                file = Path(named)
            full = cause is None or cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            failure = TrajectoryWriteError(
                f"Recording the trajectory failed {where}: writing {file} failed: {_reason(err)}. The trajectory in"
                f" {self.dirpath} is left unfinished and cannot be replayed."
                f" {'Free space on that disk' if full else 'Make that folder writable'} (or record into another"
                " folder: InfluenceTracker(dirpath=...)), then resume the fit from its last checkpoint"
                " (trainer.fit(..., ckpt_path=...)) or run it again."
            )
            failure.errno, failure.filename = (None if cause is None else cause.errno), str(file)
            self._failure = failure
            self.abandon()
            raise failure from err

    def _start_new(self) -> list[int]:
        """Delete every file of an earlier trajectory here; return the (empty) resume history."""
        steps = self.dirpath / STEPS_FILE
        removed = int(steps.is_file() and steps.stat().st_size > 0)
        removed += _remove_stale(self.dirpath / CHECKPOINT_DIR, None) + _remove_stale(self.dirpath / BATCH_DIR, None)
        removed += _remove_stale(self.dirpath / DRAWS_DIR, None)
        for name in (STEPS_FILE, FINAL_FILE, END_FILE):
            removed += int((self.dirpath / name).is_file())
            (self.dirpath / name).unlink(missing_ok=True)
        if removed:
            warnings.warn(
                f"{self.dirpath}: a new run replaces the trajectory of an earlier run found here.", stacklevel=3
            )
        return []

    def _resume(self, step: int) -> list[int]:
        """Keep the recorded trajectory strictly before ``step`` (module docstring); return the resume history."""
        meta_path = self.dirpath / META_FILE
        try:
            header = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path}: not valid JSON ({err}).") from err
        check_header(header, META_FORMAT, str(meta_path))
        differences = _meta_differences(header.get("meta", {}), self.meta)
        if differences:
            raise ValueError(
                f"{self.dirpath}: cannot resume this trajectory at step {step}, the run differs from the recorded "
                f"one: {'; '.join(differences)}. Record into another folder, or start a new run."
            )
        kept = [(line, r) for line, r in read_step_lines(self.dirpath / STEPS_FILE) if int(r["step"]) < step]
        text = "".join(line + "\n" for line, _ in kept)
        atomic_write(self.dirpath / STEPS_FILE, lambda f: f.write(text.encode("utf-8")))
        self.last_step = int(kept[-1][1]["step"]) if kept else None
        _remove_stale(self.dirpath / CHECKPOINT_DIR, step)
        _remove_stale(self.dirpath / BATCH_DIR, step)
        _remove_stale(self.dirpath / DRAWS_DIR, step)
        for name in (FINAL_FILE, END_FILE):
            (self.dirpath / name).unlink(missing_ok=True)
        return [int(s) for s in header.get("resumes", [])] + [step]

    def _check_open(self) -> None:
        if self._failure is not None:
            failure = TrajectoryWriteError(f"TrajectoryWriter({self.dirpath}) stopped at a failure: {self._failure}")
            failure.errno, failure.filename = self._failure.errno, self._failure.filename
            raise failure
        if self._steps.closed:
            raise RuntimeError(f"TrajectoryWriter({self.dirpath}) is closed.")

    def _sync_steps(self) -> None:
        """Make every step written so far durable: its batch and draws files, then ``steps.jsonl``."""
        unsynced, self._unsynced = self._unsynced, []
        sync_files(unsynced)
        self._steps.flush()
        os.fsync(self._steps.fileno())

    def write_step(self, entry: StepEntry, batch: Any | None = None, draws: list[dict] | None = None) -> None:
        """Append ``entry`` to ``steps.jsonl`` (flushed). ``batch``: the step's collated micro-batches (a list of
        batches: tensors, lists, tuples, dicts, numbers, strings), written first to ``batches/step_<t>.pt``; None
        writes no batch file. ``draws``: the random-stream state of each micro-batch's forward
        (:meth:`~lightning_influence.autodiff.draws.RandomDraws.to_record`), to ``draws/step_<t>.pt``.
        ``ValueError`` unless steps strictly increase."""
        self._check_open()
        if self.last_step is not None and entry.step <= self.last_step:
            raise ValueError(f"Step {entry.step} written after step {self.last_step}: steps must strictly increase.")
        line = json.dumps(encode_step(entry), separators=(",", ":"))
        step, files = int(entry.step), []
        if batch is not None:
            document = {"format": BATCH_FORMAT, "version": TRAJECTORY_VERSION, "step": step}
            document["batches"] = storable(list(batch), f"batch of step {entry.step}")
            files.append((self.dirpath / BATCH_DIR, document))
        if draws is not None:
            document = {"format": DRAWS_FORMAT, "version": TRAJECTORY_VERSION, "step": step, "draws": draws}
            files.append((self.dirpath / DRAWS_DIR, document))
        for directory, document in files:  # fsynced together at the next checkpoint (or the end): _sync_steps()
            with self._writing(step_file(directory, step), step):
                directory.mkdir(exist_ok=True)
                atomic_torch_save(step_file(directory, step), document, sync=False)
                self._unsynced.append(step_file(directory, step))
        with self._writing(self.dirpath / STEPS_FILE, step):
            self._steps.write(line + "\n")
            self._steps.flush()
        self.last_step = step

    def write_checkpoint(
        self,
        step: int,
        theta: torch.Tensor,
        optimizer_state: Mapping[str, torch.Tensor | None],
        frozen: Mapping[str, torch.Tensor],
    ) -> None:
        """Write the pre-step state of step ``step`` to ``checkpoints/step_<t>.pt`` (atomic; step lines fsynced first).

        Args:
            step: the global step t whose pre-step state this is; not below the last step written.
            theta: θ_t, ``Tensor[p]``.
            optimizer_state: the optimizer's flat state before step t, e.g. ``{"momentum_buffer": Tensor[p] | None}``
                or ``{"exp_avg": Tensor[p], "exp_avg_sq": Tensor[p]}``.
            frozen: values of the untracked tensors the model needs (frozen parameters, buffers), by name.
        """
        self._check_open()
        if step < 0 or (self.last_step is not None and step < self.last_step):
            raise ValueError(f"Checkpoint of step {step} after step {self.last_step} was written.")
        document = {"format": CHECKPOINT_FORMAT, "version": TRAJECTORY_VERSION, "step": int(step)}
        document["theta"] = storable(theta, "theta", copy=False)
        document["optimizer_state"] = storable(dict(optimizer_state), "optimizer_state", copy=False)
        document["frozen"] = storable(dict(frozen), "frozen", copy=False)
        with self._writing(self.dirpath / STEPS_FILE, step):
            self._sync_steps()
        file = step_file(self.dirpath / CHECKPOINT_DIR, step)
        with self._writing(file, step):
            atomic_torch_save(file, document)

    def write_final(self, step: int, theta: torch.Tensor, frozen: Mapping[str, torch.Tensor]) -> None:
        """Write θ_T (``Tensor[p]``) and the frozen values after the last step to ``final.pt`` (atomic). ``step`` = T,
        the global step of that state (the last booked step + 1 when none was skipped); above every step written."""
        self._check_open()
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"Final state at step {step}, but step {self.last_step} was written: it must come after.")
        document = {"format": FINAL_FORMAT, "version": TRAJECTORY_VERSION, "step": int(step)}
        document["theta"] = storable(theta, "theta", copy=False)
        document["frozen"] = storable(dict(frozen), "frozen", copy=False)
        with self._writing(self.dirpath / STEPS_FILE, step):
            self._sync_steps()
        with self._writing(self.dirpath / FINAL_FILE, step):
            atomic_torch_save(self.dirpath / FINAL_FILE, document)
        self.final_step = int(step)

    def close(self) -> None:
        """fsync and close ``steps.jsonl``, write the end marker ``end.json`` and remove ``writing.lock``. Idempotent;
        after a failed write it raises that failure again (the trajectory stays unfinished)."""
        if self._failure is not None:
            self._check_open()
        if self._steps.closed:
            return
        step = self.final_step if self.final_step is not None else self.last_step
        with self._writing(self.dirpath / STEPS_FILE, step):
            self._sync_steps()
            self._steps.close()
        marker = {"format": END_FORMAT, "version": TRAJECTORY_VERSION}
        marker.update(last_step=self.last_step, final_step=self.final_step)
        with self._writing(self.dirpath / END_FILE, step):
            atomic_json(self.dirpath / END_FILE, marker)
        self._lock.release()

    def abandon(self) -> None:
        """A run that failed: keep what was written, claim no end (no ``end.json``), close ``steps.jsonl`` and remove
        ``writing.lock``; the trajectory is left unfinished (a replay refuses it; a resumed fit continues it).
        Idempotent, and never raises: it runs while another error is on its way."""
        steps = getattr(self, "_steps", None)
        if steps is not None and not steps.closed:
            try:
                self._sync_steps()
            except (OSError, ValueError):  # a full disk: what could not be flushed is lost with the run
                pass
            try:
                steps.close()
            except OSError:
                pass
        self._lock.release()

    def __enter__(self) -> TrajectoryWriter:  # noqa: PYI034
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:  # a failed run: keep what was written, claim no end
            self.abandon()
