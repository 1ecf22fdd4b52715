"""Influence artifacts on disk: one JSON line per closed time window, and the final scores.

Two files live in the artifact directory (by default ``<logger log_dir>/influence``):

``windows.jsonl``
    One JSON object per line, appended (flushed and fsynced) as soon as a window closes, so a
    crash loses at most the window being written::

        {"format": "lightning-influence/windows", "version": 1, "query": "val", "index": 0,
         "start_step": 0, "end_step": 50, "epoch": 0,
         "sample_ids": [0, 1, ...], "scores": [-0.0123, 0.0045, ...]}

``final_scores.json``
    Written once at the end of fit, atomically (temporary file + ``os.replace``)::

        {"format": "lightning-influence/final", "version": 1, "estimator": "acc",
         "metadata": {...}, "queries": {"val": {"sample_ids": [...], "scores": [...]}}}

Scores are written as Python floats, whose ``repr`` round-trips float64 exactly (float32 and
lower-precision scores round-trip exactly after casting back). Nothing here knows Lightning.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import torch

from lightning_influence.result import InfluenceResult
from lightning_influence.windows import WindowSnapshot

__all__ = [
    "FINAL_FILE",
    "FINAL_FORMAT",
    "FORMAT_VERSION",
    "WINDOWS_FILE",
    "WINDOWS_FORMAT",
    "SnapshotWriter",
    "load_final_scores",
    "load_snapshots",
    "snapshots_by_query",
]

PathLike = Union[str, os.PathLike]

WINDOWS_FILE = "windows.jsonl"
FINAL_FILE = "final_scores.json"
WINDOWS_FORMAT = "lightning-influence/windows"
FINAL_FORMAT = "lightning-influence/final"
FORMAT_VERSION = 1

_WINDOW_KEYS = ("query", "index", "start_step", "end_step", "epoch", "sample_ids", "scores")


def _floats(values: torch.Tensor) -> list[float]:
    # float64 holds every float32/float16/bfloat16 value exactly, and Python floats are float64.
    return [float(v) for v in values.detach().cpu().to(torch.float64).reshape(-1).tolist()]


def _ints(values: torch.Tensor) -> list[int]:
    return [int(v) for v in values.detach().cpu().reshape(-1).tolist()]


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback for metadata: tensors and numpy values become lists or numbers."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    # Not tempfile.mkstemp: its files are private (0600); this one gets the umask's usual mode.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _snapshot_record(snapshot: WindowSnapshot) -> dict[str, Any]:
    ids, scores = snapshot.sample_ids.reshape(-1), snapshot.scores.reshape(-1)
    if ids.numel() != scores.numel():
        raise ValueError(
            f"Snapshot {snapshot.query!r}#{snapshot.index} has {ids.numel()} sample ids but {scores.numel()} scores."
        )
    return {
        "format": WINDOWS_FORMAT,
        "version": FORMAT_VERSION,
        "query": str(snapshot.query),
        "index": int(snapshot.index),
        "start_step": int(snapshot.start_step),
        "end_step": int(snapshot.end_step),
        "epoch": int(snapshot.epoch),
        "sample_ids": _ints(ids),
        "scores": _floats(scores),
    }


class SnapshotWriter:
    """Appends :class:`~lightning_influence.windows.WindowSnapshot` records to
    ``<dirpath>/windows.jsonl`` and writes ``<dirpath>/final_scores.json``.

    Args:
        dirpath: the artifact directory; created (with parents) if missing.
    """

    def __init__(self, dirpath: PathLike) -> None:
        self.dirpath = Path(dirpath)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self._repaired = False

    @property
    def windows_path(self) -> Path:
        """``<dirpath>/windows.jsonl``."""
        return self.dirpath / WINDOWS_FILE

    @property
    def final_path(self) -> Path:
        """``<dirpath>/final_scores.json``."""
        return self.dirpath / FINAL_FILE

    def _drop_partial_last_line(self) -> None:
        """A crash mid-write leaves a last line without its newline: cut it before appending, so
        the next record does not glue onto it and turn it into corruption in the middle."""
        path = self.windows_path
        if not path.exists():
            return
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            keep = data.rfind(b"\n") + 1  # 0 when the only line is partial
            warnings.warn(
                f"{path}: dropping a partial last line ({size - keep} bytes) left by an interrupted write.",
                stacklevel=3,
            )
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())

    def write(self, snapshot: WindowSnapshot) -> None:
        """Append one JSON line for ``snapshot``, then flush and fsync."""
        line = json.dumps(_snapshot_record(snapshot), separators=(",", ":"))
        if not self._repaired:
            self._drop_partial_last_line()
            self._repaired = True
        with open(self.windows_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_final(self, results: Mapping[str, InfluenceResult], metadata: Mapping[str, Any] | None = None) -> None:
        """Write ``{query: result}`` to ``final_scores.json`` atomically (replacing an older file).

        ``metadata`` must be JSON-serialisable; tensors and numpy values are converted to lists,
        anything else unknown to its ``repr``.
        """
        estimators = {r.estimator for r in results.values()}
        queries: dict[str, Any] = {}
        for name, result in results.items():
            entry: dict[str, Any] = {
                "estimator": result.estimator,
                "sample_ids": _ints(result.sample_ids),
                "scores": _floats(result.scores),
            }
            if len(entry["sample_ids"]) != len(entry["scores"]):
                raise ValueError(f"Result {name!r} has {len(entry['sample_ids'])} ids but {len(entry['scores'])} scores.")
            if result.per_example is not None:
                entry["per_example"] = [_floats(row) for row in result.per_example.reshape(len(entry["scores"]), -1)]
            queries[str(name)] = entry
        document = {
            "format": FINAL_FORMAT,
            "version": FORMAT_VERSION,
            "estimator": estimators.pop() if len(estimators) == 1 else None,
            "metadata": dict(metadata or {}),
            "queries": queries,
        }
        _atomic_write_text(self.final_path, json.dumps(document, default=_jsonable) + "\n")

    def truncate(self, keep: Mapping[str, int]) -> None:
        """Keep only the first ``keep[query]`` windows (``index < keep[query]``) of each query.

        Queries absent from ``keep`` are dropped. Used when training resumes from a checkpoint
        that knew fewer windows than the file holds, so no window is counted twice. The file is
        rewritten atomically; a partial last line is dropped. No file: nothing to do.
        """
        path = self.windows_path
        if not path.exists():
            self._repaired = True
            return
        kept = [
            line
            for _, line, record in _read_records(path)
            if record["index"] < int(keep.get(record["query"], 0))
        ]
        _atomic_write_text(path, "".join(line + "\n" for line in kept))
        self._repaired = True


def _resolve(path: PathLike, filename: str, what: str) -> Path:
    p = Path(path)
    file = p / filename if p.is_dir() else p
    if not file.is_file():
        where = f"in the directory {p}" if p.is_dir() else f"at {p}"
        raise FileNotFoundError(
            f"No influence {what} {where}: expected {filename}, which InfluenceTracker writes to "
            f"<logger log_dir>/influence (or its dirpath=, or <default_root_dir>/influence without a "
            f"logger). Pass that directory or the {filename} file itself."
        )
    return file


def _check_header(record: Any, expected: str, where: str) -> None:
    if not isinstance(record, dict) or record.get("format") != expected:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: expected format {expected!r}, found {found!r}.")
    version = record.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}: invalid format version {version!r}.")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: format version {version} is newer than this lightning-influence reads "
            f"(version {FORMAT_VERSION}); upgrade lightning-influence."
        )


def _read_records(path: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """``(line number, raw line, record)`` of every valid line of a windows file.

    A last line that is not valid JSON (crash mid-write) is skipped with a warning; invalid lines
    elsewhere, wrong formats or versions and missing fields raise ``ValueError``.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for position, (n, line) in enumerate(numbered):
        where = f"{path}, line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if position == len(numbered) - 1:
                warnings.warn(
                    f"{where}: skipping a truncated last record (interrupted write?): {err}.", stacklevel=3
                )
                continue
            raise ValueError(f"{where}: not valid JSON ({err}); the file is corrupt.") from err
        _check_header(record, WINDOWS_FORMAT, where)
        missing = [key for key in _WINDOW_KEYS if key not in record]
        if missing:
            raise ValueError(f"{where}: the record lacks {', '.join(missing)}.")
        if len(record["sample_ids"]) != len(record["scores"]):
            raise ValueError(
                f"{where}: {len(record['sample_ids'])} sample ids but {len(record['scores'])} scores."
            )
        records.append((n, line, record))
    return records


def load_snapshots(path: PathLike) -> list[WindowSnapshot]:
    """Read the window snapshots written by :class:`SnapshotWriter`.

    Args:
        path: the artifact directory or its ``windows.jsonl`` file.

    Returns:
        The snapshots of every query in time order (sorted by ``(end_step, query)``, stable), with
        ``sample_ids`` as ``LongTensor[k]`` and ``scores`` as float64 ``Tensor[k]``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: a corrupt line other than the last, an unknown format or a newer version.
    """
    file = _resolve(path, WINDOWS_FILE, "windows")
    snapshots: list[WindowSnapshot] = []
    seen: set[tuple[str, int]] = set()
    for n, _, r in _read_records(file):
        key = (r["query"], int(r["index"]))
        if key in seen:
            warnings.warn(
                f"{file}, line {n}: window {key[1]} of query {key[0]!r} appears more than once "
                f"(two runs appended to one file?); scores summed over windows would count it twice.",
                stacklevel=2,
            )
        seen.add(key)
        snapshots.append(
            WindowSnapshot(
                query=r["query"],
                index=int(r["index"]),
                start_step=int(r["start_step"]),
                end_step=int(r["end_step"]),
                epoch=int(r["epoch"]),
                sample_ids=torch.tensor(r["sample_ids"], dtype=torch.long),
                scores=torch.tensor([float(s) for s in r["scores"]], dtype=torch.float64),
            )
        )
    snapshots.sort(key=lambda s: (s.end_step, s.query))
    return snapshots


def load_final_scores(path: PathLike) -> dict[str, InfluenceResult]:
    """Read ``final_scores.json`` (``path``: the artifact directory or the file) as
    ``{query: InfluenceResult}`` with float64 scores."""
    file = _resolve(path, FINAL_FILE, "final scores")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err}).") from err
    _check_header(document, FINAL_FORMAT, str(file))
    results = {}
    for name, entry in document.get("queries", {}).items():
        if not isinstance(entry, dict) or "sample_ids" not in entry or "scores" not in entry:
            raise ValueError(f"{file}: query {name!r} lacks sample_ids or scores.")
        per_example = entry.get("per_example")
        results[name] = InfluenceResult(
            sample_ids=torch.tensor(entry["sample_ids"], dtype=torch.long),
            scores=torch.tensor([float(s) for s in entry["scores"]], dtype=torch.float64),
            per_example=None if per_example is None else torch.tensor(per_example, dtype=torch.float64),
            estimator=entry.get("estimator") or document.get("estimator") or "acc",
        )
    return results


def snapshots_by_query(snapshots: Iterable[WindowSnapshot]) -> dict[str, list[WindowSnapshot]]:
    """Group snapshots by query, each list in window order (by ``index``)."""
    grouped: dict[str, list[WindowSnapshot]] = {}
    for snap in snapshots:
        grouped.setdefault(snap.query, []).append(snap)
    return {q: sorted(snaps, key=lambda s: s.index) for q, snaps in grouped.items()}
