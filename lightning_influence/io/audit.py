"""Audit reports on disk: ``<dirpath>/audit.jsonl``, one JSON line per :class:`AuditReport`.

Each line is appended, flushed and fsynced as soon as a report is made, so a crash loses at most
the line being written::

    {"format": "lightning-influence/audit", "version": 1, "query": "val", "estimator": "acc",
     "start_step": 0, "end_step": 50, "sample_ids": [3, 17], "exact_scores": [-0.012, 0.004],
     "estimated_scores": [-0.011, 0.005], "spearman": 1.0, "pearson": 0.99, "relative_error": 0.1,
     "sign_agreement": 1.0, "worst": [[17, 0.004, 0.005], [3, -0.012, -0.011]]}

``start_step`` and ``end_step`` are null for a whole-run report. Floats are written as Python
floats, whose ``repr`` round-trips float64 exactly; the non-finite values JSON has no number for
are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (so every line is strict JSON).
Nothing here knows Lightning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lightning_influence.io.files import (
    JsonLines,
    PathLike,
    artifact_file,
    check_header,
    float_list,
    int_list,
    json_lines,
)
from lightning_influence.results.audit import AuditReport

__all__ = ["AUDIT_FILE", "AUDIT_FORMAT", "AUDIT_VERSION", "AuditWriter", "audit_record", "load_audit"]

AUDIT_FILE = "audit.jsonl"
AUDIT_FORMAT = "lightning-influence/audit"
AUDIT_VERSION = 1

_KEYS = (
    "query",
    "estimator",
    "start_step",
    "end_step",
    "sample_ids",
    "exact_scores",
    "estimated_scores",
    "spearman",
    "pearson",
    "relative_error",
    "sign_agreement",
    "worst",
)
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _encode(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else repr(value)  # "nan", "inf", "-inf"


def _decode(value: Any) -> float:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number or one of {sorted(_NON_FINITE)}, got {value!r}")
    return float(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def audit_record(report: AuditReport) -> dict[str, Any]:
    """The JSON object of one report (see the module docstring)."""
    return {
        "format": AUDIT_FORMAT,
        "version": AUDIT_VERSION,
        "query": str(report.query),
        "estimator": str(report.estimator),
        "start_step": _optional_int(report.start_step),
        "end_step": _optional_int(report.end_step),
        "sample_ids": int_list(report.sample_ids),
        "exact_scores": [_encode(v) for v in float_list(report.exact_scores)],
        "estimated_scores": [_encode(v) for v in float_list(report.estimated_scores)],
        "spearman": _encode(report.spearman),
        "pearson": _encode(report.pearson),
        "relative_error": _encode(report.relative_error),
        "sign_agreement": _encode(report.sign_agreement),
        "worst": [[int(i), _encode(ex), _encode(est)] for i, ex, est in report.worst],
    }


def _check(record: Any, where: str) -> None:
    check_header(record, AUDIT_FORMAT, AUDIT_VERSION, where)
    missing = [key for key in _KEYS if key not in record]
    if missing:
        raise ValueError(f"{where}: the record lacks {', '.join(missing)}.")
    lengths = {len(record[key]) for key in ("sample_ids", "exact_scores", "estimated_scores")}
    if len(lengths) != 1:
        raise ValueError(f"{where}: sample_ids, exact_scores and estimated_scores differ in length.")


def _report(record: dict[str, Any], where: str) -> AuditReport:
    _check(record, where)
    try:
        return AuditReport(
            query=str(record["query"]),
            sample_ids=torch.tensor([int(i) for i in record["sample_ids"]], dtype=torch.long),
            exact_scores=torch.tensor([_decode(v) for v in record["exact_scores"]], dtype=torch.float64),
            estimated_scores=torch.tensor([_decode(v) for v in record["estimated_scores"]], dtype=torch.float64),
            spearman=_decode(record["spearman"]),
            pearson=_decode(record["pearson"]),
            relative_error=_decode(record["relative_error"]),
            sign_agreement=_decode(record["sign_agreement"]),
            worst=[(int(i), _decode(ex), _decode(est)) for i, ex, est in record["worst"]],
            start_step=_optional_int(record["start_step"]),
            end_step=_optional_int(record["end_step"]),
            estimator=str(record["estimator"]),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: invalid audit record ({err}).") from err


def _read(path: Path) -> list[tuple[str, AuditReport]]:
    """``(raw line, report)`` of every valid line; a last line that is not valid JSON (a crash
    mid-write) is skipped with a warning, any other invalid line raises ``ValueError``."""
    return [(line, _report(record, f"{path}, line {n}")) for n, line, record in json_lines(path)]


def load_audit(path: PathLike) -> list[AuditReport]:
    """Read the reports written by :class:`AuditWriter`, in the order they were written.

    Args:
        path: the artifact directory or its ``audit.jsonl`` file.

    Returns:
        The reports, with ``sample_ids`` as ``LongTensor[N]`` and the scores as float64 ``Tensor[N]``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: a corrupt line other than the last, an unknown format or a newer version.
    """
    return [report for _, report in _read(artifact_file(path, AUDIT_FILE, "audit"))]


class AuditWriter:
    """Appends :class:`AuditReport` records to ``<dirpath>/audit.jsonl`` (one line each, flushed and
    fsynced). Before its first append it drops a partial last line left by an interrupted write.

    Args:
        dirpath: the artifact directory; created (with parents) if missing.
    """

    def __init__(self, dirpath: PathLike) -> None:
        self.dirpath = Path(dirpath)
        self._lines = JsonLines(self.dirpath / AUDIT_FILE)

    @property
    def path(self) -> Path:
        """``<dirpath>/audit.jsonl``."""
        return self.dirpath / AUDIT_FILE

    def write(self, report: AuditReport) -> None:
        """Append one JSON line for ``report``, then flush and fsync."""
        self._lines.append(json.dumps(audit_record(report), separators=(",", ":"), allow_nan=False))

    def truncate(self, keep: int) -> None:
        """Keep only the first ``keep`` reports (for a run resumed from a checkpoint that knew ``keep``).

        The file is rewritten atomically; a partial last line is dropped. No file: nothing to do.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"keep must be a non-negative int, got {keep!r}.")
        self._lines.keep([line for line, _ in _read(self.path)][:keep] if self.path.exists() else [])

    def start(self, keep: int | None) -> None:
        """Prepare for a fit: a resumed fit keeps its first ``keep`` reports; a fresh fit (``keep=None``)
        moves an existing ``audit.jsonl`` aside (to ``audit.<n>.jsonl``) rather than mixing runs."""
        if keep is not None:
            self.truncate(keep)
            return
        self._lines.move_aside("the audit")
