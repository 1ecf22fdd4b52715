"""Writing a trajectory while training; the format is described in :mod:`lightning_influence.trajectory.reader`.
Nothing here knows Lightning.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_influence.io.files import PathLike
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


class TrajectoryWriter:
    """Writes the trajectory of one training run into ``dirpath`` (created with parents).

    Args:
        dirpath: the trajectory folder (conventionally ``<artifact dir>/trajectory``).
        meta: the run's description, JSON-serialisable (tuples become lists, tensors lists): parameter layout,
            optimizer kind, dtype, num_samples, checkpoint_every_n_steps, fingerprint seed and size, world size...
        resume_from_step: None for a new run: an earlier trajectory in ``dirpath`` is deleted (with a warning).
            s for a run resumed from a checkpoint taken before global step s: steps, checkpoints and batches
            strictly before s are kept, later ones (and ``final.pt``, ``end.json``) deleted, and ``meta`` must
            equal the recorded meta except for :data:`VOLATILE_META_KEYS` (``ValueError`` naming the
            differences). Without a recorded trajectory, a new one is started.

    Only one process (rank 0) should write. Step lines are flushed at every step and fsynced at every
    checkpoint, at ``write_final`` and ``close``; checkpoints, batches and final state are written atomically.
    """

    def __init__(self, dirpath: PathLike, meta: Mapping[str, Any], resume_from_step: int | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.meta: dict[str, Any] = plain(dict(meta), "meta")
        self.last_step: int | None = None
        self.final_step: int | None = None
        if resume_from_step is not None and (self.dirpath / META_FILE).is_file():
            resumes = self._resume(int(resume_from_step))
        else:
            resumes = self._start_new()
        header = {"format": META_FORMAT, "version": TRAJECTORY_VERSION, "meta": self.meta, "resumes": resumes}
        atomic_json(self.dirpath / META_FILE, header)
        (self.dirpath / CHECKPOINT_DIR).mkdir(exist_ok=True)
        self._steps = open(self.dirpath / STEPS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

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
        if self._steps.closed:
            raise RuntimeError(f"TrajectoryWriter({self.dirpath}) is closed.")

    def _sync_steps(self) -> None:
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
        if batch is not None:
            directory = self.dirpath / BATCH_DIR
            directory.mkdir(exist_ok=True)
            document = {"format": BATCH_FORMAT, "version": TRAJECTORY_VERSION, "step": int(entry.step)}
            document["batches"] = storable(list(batch), f"batch of step {entry.step}")
            atomic_torch_save(step_file(directory, entry.step), document)
        if draws is not None:
            directory = self.dirpath / DRAWS_DIR
            directory.mkdir(exist_ok=True)
            document = {"format": DRAWS_FORMAT, "version": TRAJECTORY_VERSION, "step": int(entry.step), "draws": draws}
            atomic_torch_save(step_file(directory, entry.step), document)
        self._steps.write(line + "\n")
        self._steps.flush()
        self.last_step = int(entry.step)

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
        self._sync_steps()
        document = {"format": CHECKPOINT_FORMAT, "version": TRAJECTORY_VERSION, "step": int(step)}
        document["theta"] = storable(theta, "theta")
        document["optimizer_state"] = storable(dict(optimizer_state), "optimizer_state")
        document["frozen"] = storable(dict(frozen), "frozen")
        atomic_torch_save(step_file(self.dirpath / CHECKPOINT_DIR, step), document)

    def write_final(self, step: int, theta: torch.Tensor, frozen: Mapping[str, torch.Tensor]) -> None:
        """Write θ_T (``Tensor[p]``) and the frozen values after the last step to ``final.pt`` (atomic). ``step`` = T,
        the global step of that state (the last booked step + 1 when none was skipped); above every step written."""
        self._check_open()
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"Final state at step {step}, but step {self.last_step} was written: it must come after.")
        self._sync_steps()
        document = {"format": FINAL_FORMAT, "version": TRAJECTORY_VERSION, "step": int(step)}
        document["theta"] = storable(theta, "theta")
        document["frozen"] = storable(dict(frozen), "frozen")
        atomic_torch_save(self.dirpath / FINAL_FILE, document)
        self.final_step = int(step)

    def close(self) -> None:
        """fsync and close ``steps.jsonl`` and write the end marker ``end.json``. Idempotent."""
        if self._steps.closed:
            return
        self._sync_steps()
        self._steps.close()
        marker = {"format": END_FORMAT, "version": TRAJECTORY_VERSION}
        marker.update(last_step=self.last_step, final_step=self.final_step)
        atomic_json(self.dirpath / END_FILE, marker)

    def __enter__(self) -> TrajectoryWriter:  # noqa: PYI034
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        elif not self._steps.closed:  # a failed run: keep what was written, claim no end
            self._sync_steps()
            self._steps.close()
