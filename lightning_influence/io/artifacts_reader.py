"""Reading the artifact files back (``windows.jsonl``, ``final_scores.json``) without the callback.

The format is described in :mod:`lightning_influence.io.artifacts`. Nothing here knows Lightning.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from lightning_influence.io.files import PathLike, artifact_file, check_header, json_lines
from lightning_influence.results.result import InfluenceResult
from lightning_influence.results.windows import WindowSnapshot

WINDOWS_FILE = "windows.jsonl"
FINAL_FILE = "final_scores.json"
WINDOWS_FORMAT = "lightning-influence/windows"
FINAL_FORMAT = "lightning-influence/final"
FORMAT_VERSION = 1

_WINDOW_KEYS = ("query", "index", "start_step", "end_step", "epoch", "sample_ids", "scores")


def read_window_records(path: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """``(line number, raw line, record)`` of every valid line of a windows file.

    A last line that is not valid JSON (crash mid-write) is skipped with a warning; invalid lines
    elsewhere, wrong formats or versions and missing fields raise ``ValueError``.
    """
    records = []
    for n, line, record in json_lines(path):
        where = f"{path}, line {n}"
        check_header(record, WINDOWS_FORMAT, FORMAT_VERSION, where)
        missing = [key for key in _WINDOW_KEYS if key not in record]
        if missing:
            raise ValueError(f"{where}: the record lacks {', '.join(missing)}.")
        if len(record["sample_ids"]) != len(record["scores"]):
            raise ValueError(f"{where}: {len(record['sample_ids'])} sample ids but {len(record['scores'])} scores.")
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
    file = artifact_file(path, WINDOWS_FILE, "windows")
    snapshots: list[WindowSnapshot] = []
    seen: set[tuple[str, int]] = set()
    for n, _, r in read_window_records(file):
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
    file = artifact_file(path, FINAL_FILE, "final scores")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err}).") from err
    check_header(document, FINAL_FORMAT, FORMAT_VERSION, str(file))
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
