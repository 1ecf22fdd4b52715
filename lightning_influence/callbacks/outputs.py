"""Where a fit's windows, final scores and audit reports go: the Trainer's loggers and the artifact files.

:func:`attach_outputs` wires the sinks of one fit: the loggers
(:class:`~lightning_influence.reporting.window_sink.LoggerSink`), the artifact files and the audit's writers.

Attached on rank zero only, once per fit, by the callback. A resumed or continued fit keeps the windows
and audit reports its state knows; a fresh one moves older files aside.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl

from lightning_influence.core.audit import FitAudit
from lightning_influence.core.fit import TrackedFit
from lightning_influence.io.artifacts import SnapshotWriter
from lightning_influence.io.audit import AuditWriter
from lightning_influence.reporting.audit import log_audit
from lightning_influence.reporting.window_sink import LoggerSink, logger_step
from lightning_influence.results.audit import AuditReport
from lightning_influence.results.previews import image_preview
from lightning_influence.results.result import InfluenceResult
from lightning_influence.results.windows import WindowRecorder, WindowSink, WindowSnapshot


def attach_outputs(trainer: pl.Trainer, fit: TrackedFit, namespace: str, dirpath: str | None, keep: bool) -> None:
    """Loggers for every closed window (and audit report); with ``dirpath``, ``windows.jsonl``,
    ``final_scores.json`` and ``audit.jsonl`` there."""
    if fit.parts.audit is not None:
        _attach_audit(trainer, fit.parts.audit, namespace, dirpath, keep)
    config = fit.config
    preview = image_preview if config.sample_preview == "auto" else config.sample_preview
    sink = LoggerSink(
        trainer.loggers, config.log_top_k, namespace, config.log_figure_every_n_windows, preview,
        fit.context.train_dataset,
    )  # fmt: skip
    fit.context.sinks.append(sink)
    if dirpath is not None:
        writer = SnapshotWriter(dirpath)
        writer.start({q: len(fit.windows(q)) for q in fit.config.queries} if keep else None)
        fit.context.sinks.append(writer)


def _attach_audit(trainer: pl.Trainer, audit: FitAudit, namespace: str, dirpath: str | None, keep: bool) -> None:
    def log(report: AuditReport) -> None:
        assert report.end_step is not None  # a window's report: the window has an end
        log_audit(trainer.loggers, report, namespace, logger_step(report.end_step))

    audit.sinks.append(log)
    if dirpath is not None:
        writer = AuditWriter(dirpath)
        writer.start(audit.num_windows if keep else None)
        audit.sinks.append(writer.write)


ALL_SAMPLES = "all_samples"
"""The tag part (``<namespace>/all_samples/<query>/...``) and sub-folder of the every-sample replay's outputs."""


def publish_every_sample(
    trainer: pl.Trainer,
    fit: TrackedFit,
    namespace: str,
    dirpath: str | None,
    windows: Mapping[str, list[WindowSnapshot]],
    results: Mapping[str, InfluenceResult],
) -> None:
    """The end-of-fit replay's windows of every sample, as the live windows are reported: the loggers under
    ``<namespace>/all_samples`` (scalars, histograms, tables, figure, previews at each window's step) and, with
    ``dirpath``, ``<dirpath>/all_samples/windows.jsonl`` and ``final_scores.json``."""
    config = fit.config
    preview = image_preview if config.sample_preview == "auto" else config.sample_preview
    sinks: list[WindowSink] = [
        LoggerSink(
            trainer.loggers,
            config.log_top_k,
            f"{namespace}/{ALL_SAMPLES}",
            config.log_figure_every_n_windows,
            preview,
            fit.context.train_dataset,
        )  # fmt: skip
    ]
    if dirpath is not None:
        writer = SnapshotWriter(Path(dirpath) / ALL_SAMPLES)
        writer.start(None)
        sinks.append(writer)
    for name, snapshots in windows.items():
        if not snapshots:
            continue
        recorder, total = WindowRecorder(snapshots[0].sample_ids, snapshots[0].start_step), None
        for s in snapshots:
            total = s.scores if total is None else total + s.scores
            closed = recorder.close(name, s.end_step, s.epoch, total)
            for sink in sinks:
                sink.window(closed, recorder)
    metadata = {**fit.context.metadata, "steps": fit.state.global_step, "every_sample": "adjoint replay"}
    for sink in sinks:
        sink.final(results, metadata)
