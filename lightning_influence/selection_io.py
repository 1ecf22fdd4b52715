"""Where selection decisions go: the loggers (scalars and a TensorBoard table) and ``selection.jsonl``.

One JSON line per decision (:meth:`SelectionDecision.to_record`), appended and fsynced like the windows
file; :func:`load_selection` reads them back. Nothing here knows the Trainer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lightning_influence.files import JsonLines, check_header, json_lines
from lightning_influence.selection import SELECTION_FORMAT, SELECTION_VERSION, SelectionDecision

SELECTION_FILE = "selection.jsonl"


class SelectionWriter:
    """Appends decisions to ``<dirpath>/selection.jsonl``; a resumed run keeps its first lines, a fresh one moves
    an old file aside."""

    def __init__(self, dirpath: str | os.PathLike) -> None:
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


def load_selection(path: str | os.PathLike) -> list[SelectionDecision]:
    """The decisions of ``selection.jsonl`` (or of the folder holding it), in the order they were made."""
    path = Path(path)
    if path.is_dir():
        path = path / SELECTION_FILE
    decisions = []
    for n, _, record in json_lines(path, "decision"):
        check_header(record, SELECTION_FORMAT, SELECTION_VERSION, f"{path}, line {n}")
        decisions.append(SelectionDecision.from_record(record))
    return decisions


def decision_table(decision: SelectionDecision, top_k: int) -> str:
    """A Markdown table of the removed ids and their window scores (the ``top_k`` most harmful)."""
    head = (
        f"**{decision.query}**, after window {decision.window} (steps {decision.start_step}–{decision.end_step - 1}):"
        f" removed {decision.sample_ids.numel()}, {decision.total_removed} in total."
    )
    rows = [f"| {r + 1} | {int(i)} | {float(s):+.4e} |" for r, (i, s) in
            enumerate(zip(decision.sample_ids[:top_k], decision.scores[:top_k]))]  # fmt: skip
    if not rows:
        return head + " No sample qualified."
    return "\n".join([head, "", "| rank | sample id | window score |", "|---:|---:|---:|", *rows])


@rank_zero_only
def log_decision(loggers: Iterable[Logger], decision: SelectionDecision, namespace: str, step: int, top_k: int) -> None:
    """``<namespace>/<query>/selection/removed_in_window`` and ``.../removed_total`` to every logger; the table of
    removed ids to TensorBoard as ``<namespace>/<query>/selection/removed``."""
    prefix = f"{namespace}/{decision.query}/selection"
    metrics = {f"{prefix}/removed_in_window": float(decision.sample_ids.numel()),
               f"{prefix}/removed_total": float(decision.total_removed)}  # fmt: skip
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(f"{prefix}/removed", decision_table(decision, top_k), global_step=step)
