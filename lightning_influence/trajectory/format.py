"""The trajectory's file names, format headers and record (de)serialisation; see
:mod:`lightning_influence.trajectory.reader` for the format itself. Nothing here knows Lightning.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_influence.io import files

TRAJECTORY_DIR = "trajectory"
META_FILE = "meta.json"
STEPS_FILE = "steps.jsonl"
CHECKPOINT_DIR = "checkpoints"
BATCH_DIR = "batches"
DRAWS_DIR = "draws"  # the random-stream state of each micro-batch's forward, for models that draw (dropout)
FINAL_FILE = "final.pt"
END_FILE = "end.json"
WRITING_FILE = "writing.lock"  # held by the writer from its start to its close (or failure): a run in progress

META_FORMAT = "lightning-influence/trajectory"
STEP_FORMAT = "lightning-influence/trajectory-step"
CHECKPOINT_FORMAT = "lightning-influence/trajectory-checkpoint"
BATCH_FORMAT = "lightning-influence/trajectory-batches"
DRAWS_FORMAT = "lightning-influence/trajectory-draws"
FINAL_FORMAT = "lightning-influence/trajectory-final"
END_FORMAT = "lightning-influence/trajectory-end"
TRAJECTORY_VERSION = 1

#: meta keys a resumed run may change (everything else must equal the recorded meta)
VOLATILE_META_KEYS = frozenset({"checkpoint_every_n_steps", "expected_steps"})

_STEP_KEYS = ("step", "epoch", "groups", "micro_batches", "clip", "fingerprint")
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


@dataclass(frozen=True)
class StepEntry:
    """One booked optimizer step t (θ_t → θ_{t+1}), as one line of ``steps.jsonl``.

    Attributes:
        step: global step t (0-based; strictly increasing along a trajectory, gaps for skipped steps).
        epoch: the epoch of the step.
        groups: per optimizer param group, its hyper-parameters as the step used them: ``lr``,
            ``weight_decay``, ``momentum``, ``dampening``, ``nesterov``, ``first_momentum_step``, ``beta1``,
            ``beta2``, ``eps``, ``step`` (``dataclasses.asdict(GroupStep)`` without ``region``).
        micro_batches: ``(sample ids in row order, weight w_m)`` per micro-batch; under DDP every rank's,
            rank-major.
        clip: ``{"kind": "norm", "max_norm": c, "other_sq_norm": x}``, ``{"kind": "value", "clip_value": c}``
            or None.
        fingerprint: ``{"theta": [...], "grad": [...]}``, :func:`fingerprint` of θ_t and of the step gradient.
    """

    step: int
    epoch: int
    groups: list[dict[str, Any]]
    micro_batches: list[tuple[list[int], float]]
    clip: dict[str, Any] | None
    fingerprint: dict[str, list[float]]


def plain(value: Any, where: str = "value") -> Any:
    """``value`` as JSON types (dict with str keys, list, str, int, float, bool, None); tuples become lists,
    tensors and numpy values lists or numbers. Anything else raises ``TypeError`` naming ``where``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} cannot be written to JSON; use numbers, strings, lists, dicts.")


def encode_step(entry: StepEntry) -> dict[str, Any]:
    """The JSON record of one step line (header first)."""
    return {
        "format": STEP_FORMAT,
        "version": TRAJECTORY_VERSION,
        "step": int(entry.step),
        "epoch": int(entry.epoch),
        "groups": [plain(dict(g), "groups") for g in entry.groups],
        "micro_batches": [[[int(i) for i in ids], float(w)] for ids, w in entry.micro_batches],
        "clip": None if entry.clip is None else plain(dict(entry.clip), "clip"),
        "fingerprint": {str(k): [float(x) for x in v] for k, v in entry.fingerprint.items()},
    }


def decode_step(record: dict[str, Any], where: str) -> StepEntry:
    """A :class:`StepEntry` from a step record (header already checked); ``ValueError`` for missing fields."""
    missing = [key for key in _STEP_KEYS if key not in record]
    if missing:
        raise ValueError(f"{where}: the step record lacks {', '.join(missing)}.")
    try:
        micro = [([int(i) for i in ids], float(w)) for ids, w in record["micro_batches"]]
        prints = {str(k): [float(x) for x in v] for k, v in record["fingerprint"].items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: malformed micro_batches or fingerprint ({err}).") from err
    return StepEntry(
        step=int(record["step"]),
        epoch=int(record["epoch"]),
        groups=[dict(g) for g in record["groups"]],
        micro_batches=micro,
        clip=None if record["clip"] is None else dict(record["clip"]),
        fingerprint=prints,
    )


def check_header(record: Any, expected: str, where: str) -> None:
    """``ValueError`` unless ``record`` is a dict with ``format == expected`` and a version this package reads."""
    files.check_header(record, expected, TRAJECTORY_VERSION, where)


def read_step_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(raw line, record)`` of every step line of ``steps.jsonl`` (none if the file is missing), read line by line.

    A last line that is not valid JSON (a crash mid-write) is dropped with a warning; an invalid line
    elsewhere, a wrong format or a newer version raises ``ValueError``.
    """
    if not path.is_file():
        return []
    out = []
    for n, line, record in files.json_lines(path, what="step line"):
        check_header(record, STEP_FORMAT, f"{path}, line {n}")
        out.append((line, record))
    return out


atomic_write = files.atomic_write


def atomic_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` as indented JSON (floats as ``repr``: float64 round-trips) atomically."""
    text = json.dumps(document, indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(path: Path, obj: Any, sync: bool = True) -> None:
    """``torch.save(obj)`` to ``path`` atomically (``sync=False``: not fsynced, see :func:`files.atomic_write`)."""
    if sync:
        atomic_write(path, lambda f: torch.save(obj, f))
    else:
        atomic_write(path, lambda f: torch.save(obj, f), sync=False)


def step_file(directory: Path, step: int) -> Path:
    """``directory/step_<t>.pt``."""
    return directory / f"step_{int(step)}.pt"


def listed_steps(directory: Path) -> list[int]:
    """Sorted steps t of the ``step_<t>.pt`` files in ``directory`` (temporary files ignored)."""
    if not directory.is_dir():
        return []
    found = (_STEP_FILE.match(name) for name in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found if m)


def _compact_cpu(t: torch.Tensor) -> bool:
    """``t`` is on the CPU, contiguous, and its storage holds exactly its elements (torch.save writes the whole
    storage of a tensor: a view of a larger one would store all of it)."""
    return (
        t.device.type == "cpu"
        and t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def storable(value: Any, where: str, copy: bool = True) -> Any:
    """A copy of ``value`` that ``torch.load(weights_only=True)`` reads back: tensors detached, on the CPU, with
    their own compact storage; lists, tuples, dicts, str, int, float, bool, None kept. Else ``TypeError``.

    ``copy=False``: a tensor already on the CPU with its own compact storage is kept as it is (detached), not
    copied; for tensors the caller owns and no one changes until they are saved (a recording's fresh copies)."""
    if isinstance(value, torch.Tensor):
        if not copy and _compact_cpu(value):
            return value.detach()
        return value.detach().to("cpu", copy=True).contiguous()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list) or type(value) is tuple:  # not named tuples: weights_only cannot load them
        items = [storable(v, f"{where}[{i}]", copy) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: storable(v, f"{where}[{k!r}]", copy) for k, v in value.items()}
    raise TypeError(
        f"{where}: {type(value).__name__} cannot be stored for torch.load(weights_only=True); "
        "use tensors, numbers, strings, lists, tuples and dicts."
    )


#: what to do about a damaged trajectory file, in the words of the error
DAMAGED_FIX = (
    "Record the run again, or resume the fit from a Lightning checkpoint taken before this file's step"
    " (trainer.fit(..., ckpt_path=...)): the trajectory is cut back to that step and rewritten."
)


def load_torch(path: Path, expected: str, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with its format header checked; a truncated or overwritten file raises
    :class:`~lightning_influence.errors.DamagedFileError` naming it."""
    document = files.load_torch_file(path, DAMAGED_FIX, map_location=map_location, mmap=mmap)
    check_header(document, expected, str(path))
    return document
