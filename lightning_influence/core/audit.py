"""The faithfulness audit of one fit: a few samples tracked exactly, next to the main estimator ([concepts.md: The
exact counterfactual]).

:class:`FitAudit` holds an :class:`~lightning_influence.estimators.exact.ExactEngine` over the audited ids, books every
step into it (the same step record as the main estimator), and at every window boundary compares the main
estimator's window scores on those ids with the exact ones (:func:`~lightning_influence.results.audit.audit_report`).
The reports go to the audit sinks (loggers, ``audit.jsonl``); after fit, :meth:`FitAudit.report` compares any
query. It measures the user's own run; it bounds nothing. Nothing here knows Lightning.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from lightning_influence.estimators.base import QueryProbe
from lightning_influence.estimators.exact import ExactEngine
from lightning_influence.records import BookedStep
from lightning_influence.results.audit import AuditReport, audit_report
from lightning_influence.results.windows import WindowRecorder, WindowSnapshot
from lightning_influence.sample_ids import RowIndex

AuditSink = Callable[[AuditReport], None]


def choose_audit_ids(tracked_ids: torch.Tensor, count: int, seed: int, given: torch.Tensor | None) -> torch.Tensor:
    """The audited ids: ``given`` (each must be tracked), or ``count`` tracked ids drawn with ``seed`` (sorted)."""
    if given is not None:
        missing = given[~torch.isin(given, tracked_ids)]
        if missing.numel():
            raise ValueError(
                f"audit_ids {missing[:10].tolist()} are not tracked: the audit compares the main estimator's scores"
                " of tracked samples with exact ones. Add them to track=, or leave track=None."
            )
        return given.sort().values
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(tracked_ids.numel(), generator=generator)[: min(count, tracked_ids.numel())]
    return tracked_ids[picked].sort().values


class FitAudit:
    """Exact states for ``audit_ids`` and their comparison with the main estimator.

    Args:
        engine: the exact estimator over ``audit_ids`` (row r is ``audit_ids[r]``).
        audit_ids: ``LongTensor[N]``.
        tracked_ids: the main estimator's tracked ids (to find the audited samples' rows there).
        num_samples: the training set's size.
        start_step: where the fit's first window starts.
        estimator: the main estimator's name (recorded in the reports).
        sinks: receive every window's report (rank zero: loggers, the audit file).
    """

    def __init__(
        self,
        engine: ExactEngine,
        audit_ids: torch.Tensor,
        tracked_ids: torch.Tensor,
        num_samples: int,
        start_step: int,
        estimator: str,
        sinks: Sequence[AuditSink] = (),
    ) -> None:
        self.engine, self.audit_ids, self.estimator = engine, audit_ids, estimator
        self.sinks = list(sinks)
        self._row_index = RowIndex(audit_ids, num_samples)
        main_row = torch.full((num_samples,), -1, dtype=torch.long)
        main_row[tracked_ids] = torch.arange(tracked_ids.numel())
        self.main_rows = main_row[audit_ids]  # the audited samples' rows in the main estimator
        self.recorder = WindowRecorder(audit_ids, start_step)
        self.reports: dict[str, list[AuditReport]] = {}

    def book(self, step: BookedStep) -> None:
        """Advance the exact states over one booked step (a step consumer)."""
        record = step.record
        parts = [self._row_index.part(m) for m in record.micro_batches]
        with torch.enable_grad():
            self.engine.book(record, parts, step.reduce)
        self.engine.check_finite(record.step, self.audit_ids)

    def close(self, name: str, end_step: int, epoch: int, probe: QueryProbe, window_scores: torch.Tensor) -> None:
        """Compare the window that just closed: ``window_scores: Tensor[k]`` are the main estimator's."""
        exact = self.recorder.close(name, end_step, epoch, self.engine.totals(name, probe))
        report = self._window_report(exact, window_scores)
        self.reports.setdefault(name, []).append(report)
        for sink in self.sinks:
            sink(report)

    def _window_report(self, exact: WindowSnapshot, window_scores: torch.Tensor) -> AuditReport:
        estimated = window_scores[self.main_rows]
        return audit_report(
            exact.query, self.audit_ids, exact.scores, estimated, self.estimator, exact.start_step, exact.end_step
        )

    def report(self, name: str, probe: QueryProbe, main_scores: torch.Tensor) -> AuditReport:
        """The whole run on any query: the exact f(θ_T + δθ_j) − f(θ_T) against ``main_scores: Tensor[k]``."""
        exact = self.engine.answer(probe).detach().cpu()
        return audit_report(name, self.audit_ids, exact, main_scores[self.main_rows], self.estimator)

    @property
    def num_windows(self) -> int:
        """The audited windows so far, all queries together (one report each)."""
        return sum(len(self.recorder.windows(name)) for name in self.recorder.queries)

    def state_dict(self) -> dict[str, Any]:
        return {
            "audit_ids": self.audit_ids.clone(),
            "engine": self.engine.state_dict(),
            "windows": self.recorder.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], main: WindowRecorder) -> None:
        """Restore the exact states and windows; the reports are recomputed from them and ``main``'s windows."""
        if not torch.equal(state["audit_ids"], self.audit_ids):
            raise ValueError("The checkpoint's audit follows other sample ids than this tracker's audit.")
        self.engine.load_state_dict(state["engine"])
        self.recorder.load_state_dict(state["windows"])
        self.reports = {
            name: [self._window_report(e, m.scores) for e, m in zip(self.recorder.windows(name), main.windows(name))]
            for name in self.recorder.queries
        }
