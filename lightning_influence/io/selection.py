"""Selection decisions on disk: ``selection.jsonl``.

One JSON line per decision (:meth:`SelectionDecision.to_record`), appended and fsynced like the windows
file; :func:`load_selection` reads them back. Nothing here knows Lightning.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning_influence.io.files import JsonLines, PathLike, check_header, json_lines
from lightning_influence.results.selection import SELECTION_FORMAT, SELECTION_VERSION, SelectionDecision

SELECTION_FILE = "selection.jsonl"


class SelectionWriter:
    """Appends decisions to ``<dirpath>/selection.jsonl``; a resumed run keeps its first lines, a fresh one moves
    an old file aside."""

    def __init__(self, dirpath: PathLike) -> None:
        self.path = Path(dirpath) / SELECTION_FILE
        self._lines = JsonLines(self.path)

    def start(self, keep: int | None) -> None:
        """``keep``: decisions a resumed run already made (their lines stay); None: a fresh run."""
        if keep is None:
            self._lines.move_aside("selection decisions")
        elif self.path.exists():
            self._lines.keep([line for _, line, _ in json_lines(self.path, "decision")][:keep])

    def write(self, decision: SelectionDecision) -> None:
        self._lines.append(json.dumps(decision.to_record(), separators=(",", ":"), allow_nan=False))


def load_selection(path: PathLike) -> list[SelectionDecision]:
    """The decisions of ``selection.jsonl`` (or of the folder holding it), in the order they were made."""
    path = Path(path)
    if path.is_dir():
        path = path / SELECTION_FILE
    decisions = []
    for n, _, record in json_lines(path, "decision"):
        check_header(record, SELECTION_FORMAT, SELECTION_VERSION, f"{path}, line {n}")
        decisions.append(SelectionDecision.from_record(record))
    return decisions
