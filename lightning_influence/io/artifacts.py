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
from pathlib import Path
from typing import Any, Mapping

import torch

from lightning_influence.io.artifacts_reader import (
    FINAL_FILE,
    FINAL_FORMAT,
    FORMAT_VERSION,
    WINDOWS_FILE,
    WINDOWS_FORMAT,
    load_final_scores,
    load_snapshots,
    read_window_records,
    snapshots_by_query,
)
from lightning_influence.io.files import JsonLines, PathLike, atomic_write_text, float_list, int_list
from lightning_influence.results.result import InfluenceResult
from lightning_influence.results.windows import WindowSnapshot

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
        "sample_ids": int_list(ids),
        "scores": float_list(scores),
    }


class SnapshotWriter:
    """Appends :class:`~lightning_influence.results.windows.WindowSnapshot` records to
    ``<dirpath>/windows.jsonl`` and writes ``<dirpath>/final_scores.json``.

    Args:
        dirpath: the artifact directory; created (with parents) if missing.
    """

    def __init__(self, dirpath: PathLike) -> None:
        self.dirpath = Path(dirpath)
        self._lines = JsonLines(self.dirpath / WINDOWS_FILE)

    @property
    def windows_path(self) -> Path:
        """``<dirpath>/windows.jsonl``."""
        return self.dirpath / WINDOWS_FILE

    @property
    def final_path(self) -> Path:
        """``<dirpath>/final_scores.json``."""
        return self.dirpath / FINAL_FILE

    def write(self, snapshot: WindowSnapshot) -> None:
        """Append one JSON line for ``snapshot``, then flush and fsync."""
        self._lines.append(json.dumps(_snapshot_record(snapshot), separators=(",", ":")))

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
                "sample_ids": int_list(result.sample_ids),
                "scores": float_list(result.scores),
            }
            if len(entry["sample_ids"]) != len(entry["scores"]):
                raise ValueError(
                    f"Result {name!r} has {len(entry['sample_ids'])} ids but {len(entry['scores'])} scores."
                )
            if result.per_example is not None:
                entry["per_example"] = [float_list(row) for row in result.per_example.reshape(len(entry["scores"]), -1)]
            queries[str(name)] = entry
        document = {
            "format": FINAL_FORMAT,
            "version": FORMAT_VERSION,
            "estimator": estimators.pop() if len(estimators) == 1 else None,
            "metadata": dict(metadata or {}),
            "queries": queries,
        }
        atomic_write_text(self.final_path, json.dumps(document, default=_jsonable) + "\n")

    def start(self, keep: Mapping[str, int] | None) -> None:
        """Prepare for a fit: a resumed or continued fit keeps its first ``keep[query]`` windows; a fresh fit
        (``keep=None``) moves an existing ``windows.jsonl`` aside (to ``windows.<n>.jsonl``) rather than mixing runs."""
        if keep is not None:
            self.truncate(keep)
            return
        self._lines.move_aside("the windows")

    def window(self, snapshot: WindowSnapshot, recorder: Any = None) -> None:
        """:class:`~lightning_influence.results.windows.WindowSink`: append the snapshot."""
        self.write(snapshot)

    def final(self, results: Mapping[str, InfluenceResult], metadata: Mapping[str, Any]) -> None:
        """:class:`~lightning_influence.results.windows.WindowSink`: write the final scores (when there are queries)."""
        if results:
            self.write_final(results, metadata)

    def truncate(self, keep: Mapping[str, int]) -> None:
        """Keep only the first ``keep[query]`` windows (``index < keep[query]``) of each query.

        Queries absent from ``keep`` are dropped. Used when training resumes from a checkpoint
        that knew fewer windows than the file holds, so no window is counted twice. The file is
        rewritten atomically; a partial last line is dropped. No file: nothing to do.
        """
        path = self.windows_path
        records = read_window_records(path) if path.exists() else []
        self._lines.keep([line for _, line, record in records if record["index"] < int(keep.get(record["query"], 0))])
